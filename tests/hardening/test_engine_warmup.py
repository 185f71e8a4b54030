"""Warm-up before readiness, against a real `dfastllm serve` (2 workers) on
a tiny checkpoint: the engine runs a short generation of the common shapes
with the configured KV cache mode and default block length between WARMING
and READY, so the first real request costs no more than the later ones;
`--no-warmup` skips it.

How "not slower" is measured on a shared 2-core machine: the engine's main
thread's on-CPU time per request (/proc/<pid>/task/<pid>/schedstat; one
intra-op thread, so that is all of the engine's work) is the robust
figure, since wall time also counts the minutes other processes hold the
cores. The first request after readiness is compared with the median of
requests 5 to 15 with the same prompt and parameters. The HTTP path and
the rings are exercised first (tokenize, and the cancel of an unknown
request, a round trip through the engine that runs no model), so that the
workers' own first-use costs stay out of the comparison."""

from __future__ import annotations

import statistics
import time

import httpx
import pytest

from engine_harness import EngineServer, completion

pytestmark = pytest.mark.timeout(120)

BLOCK_LENGTH = 16
REQUESTS = 15


def engine_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def warmup_records(server: EngineServer) -> list[dict]:
    return [r for r in server.log_records() if r.get("role") == "engine" and r.get("message") == "warm-up done"]


def test_the_first_request_after_readiness_costs_no_more_than_the_tenth(tmp_path):
    server = EngineServer(tmp_path, "--kv-cache", "dual", "--default-block-length", str(BLOCK_LENGTH)).wait_ready()
    try:
        warmups = warmup_records(server)
        assert len(warmups) == 1, server.log_tail()
        assert warmups[0]["kv_cache"] == "dual" and warmups[0]["block_length"] == BLOCK_LENGTH
        messages = [r.get("message") for r in server.log_records() if r.get("role") == "engine"]
        assert messages.index("warm-up done") < messages.index("engine ready")
        # It says what it does, shape by shape, between its start and end lines.
        progress = messages[messages.index("warming up") + 1:messages.index("warm-up done")]
        assert progress == [f"warm-up: {n} request(s) of 16 + {BLOCK_LENGTH} tokens" for n in (1, 4)], progress

        engine = server.engine_pid()
        fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection each time: both workers serve
        with httpx.Client(base_url=server.base_url, timeout=60, limits=fresh) as http:
            for _ in range(6):
                assert http.post("/v1/tokenize", json={"model": "tiny", "prompt": "Hello"}).status_code == 200
                assert http.delete("/v1/requests/not-a-request").status_code == 404
            body = completion(prompt="The weather today is", max_tokens=4 * BLOCK_LENGTH, steps=4 * BLOCK_LENGTH,
                              ignore_eos=True)
            cpu, wall = [], []
            for _ in range(REQUESTS):
                cpu_before, started = engine_cpu_seconds(engine), time.perf_counter()
                response = http.post("/v1/completions", json=body)
                wall.append(time.perf_counter() - started)
                cpu.append(engine_cpu_seconds(engine) - cpu_before)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] == 4 * BLOCK_LENGTH
    finally:
        assert server.stop() == 0, server.log_tail()
    steady_cpu, steady_wall = statistics.median(cpu[4:]), statistics.median(wall[4:])
    report = (f"engine CPU first {cpu[0] * 1e3:.1f} ms vs median {steady_cpu * 1e3:.1f} ms; "
              f"wall first {wall[0] * 1e3:.1f} ms vs median {steady_wall * 1e3:.1f} ms")
    assert cpu[0] <= 1.5 * steady_cpu, report


def test_no_warmup_skips_it(tmp_path):
    server = EngineServer(tmp_path, "--no-warmup").wait_ready()
    try:
        response = httpx.post(server.base_url + "/v1/completions", json=completion(), timeout=60)
        assert response.status_code == 200, response.text
    finally:
        assert server.stop() == 0, server.log_tail()
    assert warmup_records(server) == []
