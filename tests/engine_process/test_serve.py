"""`dfastllm serve` as a user runs it: supervisor, engine process and Granian
with two HTTP workers, on a tiny checkpoint; from a source checkout; and
killed outright."""

import os
import shutil
import signal
import sys

import httpx
import pytest

from dfastllm.supervisor import package_root
from dfastllm.ipc.control import pid_alive
from serve_process import ServeProcess, children, cmdline, serving, wait_for


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


@pytest.mark.timeout(150)
def test_children_remove_the_segments_when_the_supervisor_is_killed(tiny_llada_dir, tmp_path):
    serve = ServeProcess(tiny_llada_dir, str(tmp_path / "serve.log"), "--workers", "2", "--no-warmup")
    try:
        serve.wait_ready()
        children_pids = [serve.engine_pid(), *serve.worker_pids(),
                         *(pid for pid in children(serve.process.pid) if b"server.launch" in cmdline(pid))]
        assert len(children_pids) == 4 and serve.segments()
        serve.process.kill()  # SIGKILL: the supervisor cleans nothing up
        serve.process.wait()
        # The parent-death signal stops them; the engine and Granian remove the segments as they exit.
        assert wait_for(lambda: not any(pid_alive(pid) for pid in children_pids), 60), serve.log_tail()
        assert serve.segments() == [], serve.log_tail()
    finally:
        serve.stop()


@pytest.mark.timeout(150)
def test_serve_from_a_source_tree_without_compiled_modules_runs_the_installed_package(tmp_path):
    """The README's `pip install . && dfastllm serve` typed in a checkout: the
    current folder holds dfastllm/ and server/ without their compiled modules.
    Every child must still import the supervisor's packages."""
    root = package_root()
    checkout = tmp_path / "checkout"
    for package in ("dfastllm", "server"):
        shutil.copytree(os.path.join(root, package), checkout / package,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "assets"))
    # The console script's way in: its own folder, not the current one, first on sys.path.
    launcher = tmp_path / "bin" / "dfastllm"
    launcher.parent.mkdir()
    launcher.write_text("import sys\nfrom dfastllm.cli import main\nsys.exit(main())\n")
    with serving(None, str(tmp_path / "serve.log"), "--no-warmup", launcher=[sys.executable, str(launcher)],
                 cwd=checkout) as serve:
        assert os.readlink(f"/proc/{serve.engine_pid()}/cwd") == root
        body = {"model": "tiny-llada", "messages": [{"role": "user", "content": "Reverse the word lemon."}],
                "temperature": 0}
        answer = httpx.post(serve.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"], answer.text
    assert not serve.segments()
