"""`dfastllm serve --model DIR` on a tiny LLaDA2 checkpoint (LLaDA2.1-style:
its generation_config.json turns token editing on): warm-up, the chat
template, the LLaDA2 request fields over HTTP and the IPC codec, and the
same answer as the offline `LLM(DIR)`, streamed or not; the repeated
prompt's blocks come from the prefix cache, counted on /metrics."""

import json
import os

import httpx
import pytest

from dfastllm import SamplingParams
from dfastllm.llm import LLM
from dfastllm.testing import write_tiny_llada2
from serve_process import parse_metrics, serving


@pytest.mark.timeout(200)
def test_serve_llada2_matches_the_offline_api(tmp_path):
    directory = write_tiny_llada2(tmp_path / "tiny-llada2", seed=7, head_scale=12.0,
                                  generation_config={"threshold": 0.6, "editing_threshold": 0.3, "max_post_steps": 4})
    messages = [{"role": "user", "content": "hello there"}]
    fields = dict(max_tokens=12, temperature=0, block_length=4, top_k=40, max_post_steps=3)
    offline = LLM(directory, device="cpu").chat(messages, SamplingParams(**fields))[0]
    assert offline.token_ids  # an answer to compare, not an immediate end of turn
    with serving(directory, str(tmp_path / "serve.log"), "--workers", "1") as serve:
        body = {"model": os.path.basename(directory), "messages": messages, **fields}
        whole = httpx.post(serve.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["message"]["content"] == offline.text
        assert whole.json()["usage"]["completion_tokens"] == len(offline.token_ids)
        with httpx.stream("POST", serve.base_url + "/v1/chat/completions", json=body | {"stream": True},
                          timeout=60) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                       if json.loads(e)["choices"])
        assert text == offline.text
        # The second request's prompt blocks came from the first's pages (the prefix cache).
        exported = parse_metrics(httpx.get(serve.base_url + "/metrics").text)
        assert exported["dfastllm:prefix_cache_hits_total"] > 0
        assert exported["dfastllm:prefix_cache_queries_total"] >= exported["dfastllm:prefix_cache_hits_total"]
