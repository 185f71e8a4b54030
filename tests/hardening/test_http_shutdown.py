"""A stream that outlives the drain: SIGTERM to a real `dfastllm serve`
with a 3 s drain timeout while a generation far longer than that streams.
The stream ends with its own error, `server_shutting_down`, then [DONE]
(not the generic "The generation failed.").

(The exit code is not checked here: after a drain that cut a request, the
engine process has been seen to take more than the supervisor's 5 s of
grace to exit after logging "engine stopped", and be killed.)"""

from __future__ import annotations

import threading

import httpx
import orjson
import pytest

from dfastllm.testing import write_tiny_llada
from serve_process import MODEL, ServeProcess

pytestmark = pytest.mark.timeout(120)

# One token per step over a ~1000-token canvas: text after the first block of
# 8 steps, ~1000 steps in all (tens of ms each here): far longer than the drain.
LONG_TOKENS = 1000


def test_a_stream_cut_by_the_drain_timeout_ends_with_server_shutting_down(tmp_path):
    model_dir = write_tiny_llada(tmp_path / "tiny", seed=5, max_sequence_length=2048)
    events: list[dict] = []
    first_chunk = threading.Event()
    outcome = {}

    def stream(serve) -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG_TOKENS, "steps": LONG_TOKENS,
                "block_length": 8, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", serve.base_url + "/v1/completions", json=body, timeout=60) as response:
                outcome["status"] = response.status_code
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        outcome["done"] = True
                    elif line.startswith("data: "):
                        events.append(orjson.loads(line[len("data: "):]))
                        first_chunk.set()
        except httpx.HTTPError as error:
            outcome["error"] = repr(error)
        finally:
            first_chunk.set()

    serve = ServeProcess(model_dir, str(tmp_path / "serve.log"), "--served-model-name", MODEL, "--no-warmup",
                         "--drain-timeout-s", "3")
    try:
        serve.wait_ready()
        reader = threading.Thread(target=stream, args=(serve,))
        reader.start()
        assert first_chunk.wait(60) and outcome.get("status") == 200, outcome
        serve.process.terminate()  # SIGTERM to the supervisor
        reader.join(60)
    finally:
        serve.stop()
    assert outcome.get("done") and "error" not in outcome, outcome
    assert "error" not in events[0], events[0]
    error = events[-1].get("error")
    assert error is not None and error["code"] == "server_shutting_down", events[-1]
    assert error["type"] == "service_unavailable_error"
