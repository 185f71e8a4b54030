"""What the HTTP hardening tests share: a real `dfastllm serve` with two
workers (tests/server's ServeProcess), clients that open a new connection
per request (so either worker may take each one), and readers for the
metrics page, the JSON log and the audit log."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import httpx
import orjson

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "server"))
from serve_process import ServeProcess, free_port  # noqa: E402  (tests/server is not a package)

from dfastllm.testing import write_tiny_llada  # noqa: E402

MODEL = "tiny"


class _ServeWithEnv(ServeProcess):
    """ServeProcess with extra variables in the server's environment
    (ServeProcess drops every DFASTLLM_* variable of the test's own)."""

    def __init__(self, model_dir: str, log_path: str, *args: str, env: dict[str, str]):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = [sys.executable, "-m", "dfastllm.cli", "serve", "--model", model_dir, "--port", str(self.port), *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("DFASTLLM_")}
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**environment, **env})


def start_server(directory, *args: str, env: dict[str, str] | None = None) -> ServeProcess:
    """`dfastllm serve` on a tiny checkpoint, 2 workers, JSON logs, ready;
    `env`: extra environment variables for the server."""
    checkpoint = write_tiny_llada(directory / "tiny", seed=5, max_sequence_length=512)
    argv = [checkpoint, str(directory / "serve.log"), "--served-model-name", MODEL, "--workers", "2", "--no-warmup",
            "--log-format", "json", *args]
    serve = _ServeWithEnv(*argv, env=env) if env else ServeProcess(*argv)
    try:
        serve.wait_ready(timeout=150)
    except BaseException:
        serve.stop()
        raise
    return serve


def stop_server(serve: ServeProcess) -> None:
    code = serve.stop()
    assert code == 0, f"dfastllm serve exited with {code}:\n{serve.log_tail()}"


def fresh_connections(serve: ServeProcess, **kwargs) -> httpx.Client:
    """A client whose every request comes on a new connection: the two
    workers share the listening socket, so both take some."""
    kwargs.setdefault("timeout", 120)
    return httpx.Client(base_url=serve.base_url, limits=httpx.Limits(max_keepalive_connections=0), **kwargs)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}


def metrics(serve: ServeProcess, headers: dict | None = None) -> dict[str, float]:
    values = {}
    for line in httpx.get(serve.base_url + "/metrics", headers=headers, timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metric(values: dict, name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def json_lines(path) -> list[dict]:
    """Every line of a file, each parsed as one JSON object (fails on any other line)."""
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f.read().splitlines() if line.strip()]


def wait_for(condition, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def worker_pids(serve: ServeProcess) -> set[int]:
    """The Granian worker processes (children of Granian, grandchildren of the supervisor)."""
    pids = set()
    for child in _children(serve.process.pid):
        if b"server.launch" in _cmdline(child):
            pids |= set(_children(child))
    return pids


def engine_pid(serve: ServeProcess) -> int:
    for child in _children(serve.process.pid):
        if b"dfastllm.engine.process" in _cmdline(child):
            return child
    raise AssertionError("no engine process under the supervisor")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
