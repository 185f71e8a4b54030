"""`dfastllm serve` with no --model serves the embedded tiny-llada, and it
answers: questions of every task family it never saw in training, asked over
HTTP at temperature 0, checked exactly. Random weights cannot pass this, and
neither can a wrong kernel, mask or cache: it is the end-to-end check that
the whole data path (tokenizer, chat template, IPC, engine, sampler,
kernels) computes what the model was trained to compute. Run once per KV
cache mode, since the cached modes reach the answers by another path."""

from __future__ import annotations

import httpx
import pytest

from dfastllm.checkpoints import DEFAULT_MODEL_DIR
from serve_process import serving

pytestmark = pytest.mark.timeout(180)

# Questions from the held-out side of tools/tiny_tasks.py (never trained;
# `held_out_set(100)`), with the answers it must give exactly, in both KV
# modes, with and without threshold decoding: every family, the worked sum
# with a carry, the difference with a borrow and two letter counts among
# them (its model card: arithmetic 90%, counting 85%, the rest 97-100%).
QUESTIONS = [
    ("What is 84 + 48?", "4+8=12, 8+4+1=13, so 132"),
    ("51 - 25 = ?", "11-5=6, 5-1-2=2, so 26"),
    ("How many times does the letter n appear in vnznn?", "n: v-0n+1z-1n+2n+3, so 3"),
    ("How many r's are in frgr?", "r: f-0r+1g-1r+2, so 2"),
    ("Put in order: 8, 7, 1, 3, 1", "1, 1, 3, 7, 8"),
    ("Sort these numbers: 0, 6, 3", "0, 3, 6"),
    ("Reverse: cheap", "paehc"),
    ("Reverse the word pogigeh.", "hegigop"),
    ("Reverse: yellow", "wolley"),
    ("Repeat after me: toast bone edge snow", "toast bone edge snow"),
    ("Echo: dust girl wheat", "dust girl wheat"),
    ("Tell me the capital of Greece.", "Athens"),
    ("Tell me the opposite of win.", "lose"),
]


@pytest.fixture(scope="module", params=["none", "dual"])
def server(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"embedded-{request.param}")
    with serving(None, str(directory / "serve.log"), "--kv-cache", request.param, "--workers", "1") as serve:
        yield serve


def ask(server, question: str, **extra) -> str:
    body = {"model": "tiny-llada", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 32, **extra}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_serves_the_embedded_model_by_default(server):
    models = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["tiny-llada"]
    assert DEFAULT_MODEL_DIR.endswith("tiny-llada")


@pytest.mark.parametrize("question,answer", QUESTIONS)
def test_answers_held_out_questions_exactly(server, question, answer):
    assert ask(server, question) == answer


def test_parallel_decoding_gives_the_same_answers(server):
    assert [ask(server, q, threshold=0.9) for q, _ in QUESTIONS] == [a for _, a in QUESTIONS]
