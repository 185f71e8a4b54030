"""`dfastllm serve` as a user runs it: supervisor, engine process and Granian
with two HTTP workers, on a tiny checkpoint."""

import os
import signal

import httpx
import pytest

from dfastllm.ipc.control import pid_alive
from serve_process import children, cmdline, serving, wait_for


@pytest.mark.timeout(150)
def test_serve_restarts_a_killed_engine_and_stops_cleanly(tiny_llada_dir, tmp_path):
    with serving(tiny_llada_dir, str(tmp_path / "serve.log"), "--workers", "2", "--no-warmup") as serve:
        body = {"model": os.path.basename(tiny_llada_dir), "prompt": "hello there", "max_tokens": 8, "temperature": 0}
        first = httpx.post(serve.base_url + "/v1/completions", json=body, timeout=30)
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 8
        metrics = httpx.get(serve.base_url + "/metrics", timeout=10).text
        assert "dfastllm:denoising_steps_total 8.0" in metrics

        os.kill(serve.engine_pid(), signal.SIGKILL)
        assert wait_for(lambda: serve.readiness() == 503, 5), "readiness did not drop"
        assert httpx.get(serve.base_url + "/health/live", timeout=5).status_code == 200
        assert wait_for(lambda: serve.readiness() == 200, 90), serve.log_tail()
        again = httpx.post(serve.base_url + "/v1/completions", json=body, timeout=30)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    # serving() checked the exit code 0 of the SIGTERM stop.
    assert serve.segments() == []


@pytest.mark.timeout(150)
def test_serve_restarts_a_killed_http_server_and_leaves_no_worker_behind(tiny_llada_dir, tmp_path):
    with serving(tiny_llada_dir, str(tmp_path / "serve.log"), "--workers", "2", "--no-warmup") as serve:
        body = {"model": os.path.basename(tiny_llada_dir), "prompt": "hello there", "max_tokens": 8,
                "temperature": 0}
        first = httpx.post(serve.base_url + "/v1/completions", json=body, timeout=30)
        assert first.status_code == 200
        (granian,) = [pid for pid in children(serve.process.pid) if b"server.launch" in cmdline(pid)]
        workers = serve.worker_pids()
        assert len(workers) == 2
        os.kill(granian, signal.SIGKILL)
        # Its workers go with it (else they would hold the port and answer for a dead server) ...
        assert wait_for(lambda: not any(pid_alive(pid) for pid in workers), 20)
        # ... and the supervisor starts a new Granian on the same port, over the same engine.
        assert wait_for(lambda: serve.readiness() == 200, 60), serve.log_tail()
        assert serve.process.poll() is None
        again = httpx.post(serve.base_url + "/v1/completions", json=body, timeout=30)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert len(serve.worker_pids()) == 2
