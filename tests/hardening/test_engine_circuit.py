"""The engine's circuit breaker against a real `dfastllm serve` (2 workers)
whose engine fails its first three denoising steps (the fault-injection
hook, DFASTLLM_FAULT_INJECT_STEP_ERRORS): two failed steps open the circuit
(503 with Retry-After); after the cool-down the half-open probe fails too
and opens it again; after the next cool-down the engine admits exactly one
probe while it runs, refusing the others itself, and the probe's success
closes the circuit. The state reaches the control block (readiness) and
/metrics."""

from __future__ import annotations

import threading

import httpx
import pytest

from dfastllm.engine.circuit import CircuitBreaker
from dfastllm.engine.process import FAULT_INJECT_ENV
from dfastllm.ipc.control import CircuitState
from engine_harness import EngineServer, completion
from serve_process import metrics, wait_for

pytestmark = pytest.mark.timeout(120)

COOLDOWN_S = 2.0
FAILURES = 2


def circuit(server) -> tuple[float, float]:
    values = metrics(server)
    return values["dfastllm:circuit_state"], values["dfastllm:circuit_opened_total"]


def wait_until_probe_allowed(server) -> None:
    """Readiness is 503 with circuit "open" until the probe time."""
    assert wait_for(lambda: httpx.get(server.base_url + "/health/ready", timeout=5).status_code == 200,
                    timeout=COOLDOWN_S + 5, interval=0.05)


def test_failed_probe_reopens_and_one_successful_probe_closes(tmp_path):
    server = EngineServer(tmp_path, "--no-warmup", "--circuit-failures", str(FAILURES),
                          "--circuit-cooldown-s", str(COOLDOWN_S), env={FAULT_INJECT_ENV: str(FAILURES + 1)})
    server.wait_ready()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            assert circuit(server) == (0, 0)
            for _ in range(FAILURES):  # each request's first step fails: 500, the engine runs on
                failed = http.post("/v1/completions", json=completion())
                assert failed.status_code == 500, failed.text
            assert wait_for(lambda: circuit(server) == (1, 1), timeout=5)
            refused = http.post("/v1/completions", json=completion())
            assert refused.status_code == 503 and 1 <= int(refused.headers["retry-after"]) <= COOLDOWN_S + 1

            # Half-open: the probe meets the third injected fault; the circuit opens again at once.
            wait_until_probe_allowed(server)
            probe = http.post("/v1/completions", json=completion())
            assert probe.status_code == 500, probe.text
            assert circuit(server) == (1, 2)
            assert http.post("/v1/completions", json=completion()).status_code == 503

            # Half-open again: a long probe runs; meanwhile the engine refuses anyone else itself.
            wait_until_probe_allowed(server)
            probe_result = {}
            probe_started = threading.Event()

            def long_probe() -> None:
                body = completion(max_tokens=256, steps=256, ignore_eos=True, stream=True)
                with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as response:
                    probe_result["status"] = response.status_code
                    for line in response.iter_lines():
                        probe_started.set()
                        if '"finish_reason":"length"' in line.replace(" ", ""):
                            probe_result["finished"] = True
                probe_started.set()

            prober = threading.Thread(target=long_probe)
            prober.start()
            assert probe_started.wait(30) and probe_result["status"] == 200
            bystander = http.post("/v1/completions", json=completion())
            still_probing = prober.is_alive()
            prober.join(60)
            assert still_probing, "the probe ended before the second request; make it longer"
            # Half-open, so the workers let it through: the engine's REJECTED made this 503.
            assert bystander.status_code == 503 and bystander.headers.get("retry-after"), bystander.text
            assert probe_result.get("finished"), probe_result
            assert wait_for(lambda: circuit(server) == (0, 2), timeout=5)
            assert all(http.post("/v1/completions", json=completion()).status_code == 200 for _ in range(3))
            assert httpx.get(server.base_url + "/health/ready", timeout=5).status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_state_machine():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, cooldown_s=10.0, clock=clock)
    breaker.step_done(failed=True)
    breaker.step_done(failed=True)
    breaker.step_done(failed=False)  # a success in between: the count starts again
    breaker.step_done(failed=True)
    breaker.step_done(failed=True)
    assert breaker.state == CircuitState.CLOSED and breaker.admit("a") is None
    breaker.step_done(failed=True)
    assert breaker.state == CircuitState.OPEN and breaker.retry_after() == 10.0
    assert "10.0 s" in breaker.admit("b")
    clock.now += 4
    assert breaker.retry_after() == 6.0
    clock.now += 6
    assert breaker.state == CircuitState.HALF_OPEN and breaker.retry_after() == 0.0
    assert breaker.admit("probe-1") is None and breaker.admit("other") is not None
    breaker.request_done("probe-1", succeeded=False)  # cancelled: no verdict, the next request probes
    assert breaker.state == CircuitState.HALF_OPEN and breaker.admit("probe-2") is None
    breaker.request_done("other", succeeded=True)  # not the probe: no effect
    assert breaker.state == CircuitState.HALF_OPEN
    breaker.request_done("probe-2", succeeded=True)
    assert breaker.state == CircuitState.CLOSED and breaker.times_opened == 1
