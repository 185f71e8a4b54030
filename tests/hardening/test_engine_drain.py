"""Graceful drain of the whole server: SIGTERM to the supervisor of a real
`dfastllm serve` (2 workers) while a long streamed generation runs.
Readiness turns 503 at once, new generations are refused, the running one
finishes normally, then every process exits 0 and no shared memory is left."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest

from engine_harness import EngineServer, completion
from serve_process import wait_for

pytestmark = pytest.mark.timeout(120)

LONG_TOKENS = 400  # one token per step over a ~400-token canvas: a few seconds here


def test_sigterm_drains_running_requests_then_everything_exits_zero(tmp_path):
    server = EngineServer(tmp_path, "--no-warmup", "--drain-timeout-s", "60").wait_ready()
    try:
        chunks: list[dict] = []
        first_chunk = threading.Event()
        done = threading.Event()
        outcome = {}

        def stream_long_request() -> None:
            body = completion(prompt="Once upon a time", max_tokens=LONG_TOKENS, steps=LONG_TOKENS,
                              ignore_eos=True, stream=True, stream_options={"include_usage": True})
            try:
                with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as response:
                    outcome["status"] = response.status_code
                    for line in response.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            outcome["done"] = True
                            continue
                        chunks.append(orjson.loads(line[len("data: "):]))
                        first_chunk.set()
            except httpx.HTTPError as error:
                outcome["error"] = repr(error)
            finally:
                first_chunk.set()
                done.set()

        reader = threading.Thread(target=stream_long_request)
        reader.start()
        assert first_chunk.wait(30) and outcome.get("status") == 200, outcome
        server.process.terminate()  # SIGTERM to the supervisor
        signalled = time.monotonic()

        assert wait_for(lambda: httpx.get(server.base_url + "/health/ready", timeout=5).status_code == 503,
                        timeout=2, interval=0.02), "readiness did not drop"
        readiness_dropped_after = time.monotonic() - signalled
        ready = httpx.get(server.base_url + "/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["state"] == "draining"
        refused = httpx.post(server.base_url + "/v1/completions", json=completion(), timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.headers.get("retry-after")
        assert not done.is_set(), "the long request ended before the checks; make it longer"

        reader.join(60)
        assert outcome.get("done") and "error" not in outcome, outcome
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"]
        assert chunks[-1]["usage"]["completion_tokens"] == LONG_TOKENS
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()
    assert readiness_dropped_after < 1.0
    stopped = [r for r in server.log_records() if r.get("message") == "stopped" and r.get("role") == "supervisor"]
    assert stopped and stopped[-1]["exit_codes"] == {"engine": 0, "http": 0}, stopped
    assert server.segments() == []
