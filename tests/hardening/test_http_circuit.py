"""The workers' side of the engine's circuit breaker, against a real
`dfastllm serve` (2 workers) whose engine fails its first two denoising
steps (the engine's fault-injection hook): two failed generations open the
circuit; while it is open every worker refuses generations at once with
503 and Retry-After and readiness is 503 with the circuit state; once the
cool-down is over a probe request closes it again."""

from __future__ import annotations

import time

import httpx
import pytest

from dfastllm.engine.process import FAULT_INJECT_ENV
from http_harness import completion, fresh_connections, serving_tiny
from serve_process import metric, metrics, wait_for

COOLDOWN_S = 4

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("circuit")
    with serving_tiny(directory, "--circuit-failures", "2", "--circuit-cooldown-s", str(COOLDOWN_S),
                      env={FAULT_INJECT_ENV: "2"}) as serve:
        yield serve


def test_an_open_circuit_is_refused_by_every_worker_until_a_probe_closes_it(server):
    with fresh_connections(server) as http:
        for _ in range(2):  # the engine's first two steps fail: each request ends in an error
            assert http.post("/v1/completions", json=completion()).status_code == 500
        opened_at = time.monotonic()
        assert wait_for(lambda: metric(metrics(server), "dfastllm:circuit_state") == 1, timeout=5)
        refusals = [http.post("/v1/completions", json=completion()) for _ in range(6)]  # both workers
        for refused in refusals:
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "engine_unavailable"
            assert "circuit breaker" in refused.json()["error"]["message"]  # the worker's gate, not the engine's
            assert 1 <= int(refused.headers["retry-after"]) <= COOLDOWN_S
        ready = httpx.get(server.base_url + "/health/ready")
        assert ready.status_code == 503 and ready.json()["circuit"] == "open"
        assert 0 < ready.json()["circuit_retry_after_s"] <= COOLDOWN_S and ready.headers["retry-after"]
        assert httpx.get(server.base_url + "/health/live").status_code == 200
        assert http.post("/v1/tokenize", json={"prompt": "hi"}).status_code == 200  # only generation is refused
        # After the cool-down the next request is the probe; it succeeds and closes the circuit.
        time.sleep(max(0.0, opened_at + COOLDOWN_S - time.monotonic()))
        assert wait_for(lambda: http.post("/v1/completions", json=completion()).status_code == 200, timeout=10)
        assert metric(metrics(server), "dfastllm:circuit_state") == 0
        assert httpx.get(server.base_url + "/health/ready").status_code == 200
        assert all(http.post("/v1/completions", json=completion()).status_code == 200 for _ in range(4))
