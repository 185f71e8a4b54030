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
# `held_out_set(100)`), with the answers it must give exactly: the families
# the model has learned, and two worked sums with a carry and a borrow that
# it gets right (its model card: arithmetic is at 54%, letter counting is not
# there yet).
QUESTIONS = [
    ("73 + 79 = ?", "3+9=12, 7+7+1=15, so 152"),
    ("94 - 15 = ?", "14-5=9, 9-1-1=7, so 79"),
    ("Put in order: 8, 7, 1, 3, 1", "1, 1, 3, 7, 8"),
    ("Sort these numbers: 0, 6, 3", "0, 3, 6"),
    ("Reverse: cheap", "paehc"),
    ("Reverse the word pogigeh.", "hegigop"),
    ("Copy this: pen book foam chin", "pen book foam chin"),
    ("Echo: hand fire", "hand fire"),
    ("Tell me the capital of Morocco.", "Rabat"),
    ("Which word is the opposite of wet?", "dry"),
    ("Which city is the capital of Korea?", "Seoul"),
    ("Reverse: yellow", "wolley"),
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
