"""The real `dfastllm serve` (supervisor, engine process, Granian workers)
on a free port, for black-box tests: start it, wait for readiness, read its
log, find its processes and shared-memory segments, stop it as a service
manager does. One harness for tests/server and tests/hardening (importable
everywhere: pytest puts tests/ on the path, see pyproject.toml)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import orjson


# The name the black-box tests serve their tiny checkpoint under.
MODEL = "tiny"


def tiny_checkpoint(directory) -> str:
    """The tiny random LLaDA checkpoint the black-box server tests serve."""
    from dfastllm.testing import write_tiny_llada

    return write_tiny_llada(directory / "tiny", seed=5, max_sequence_length=512)


def completion(**fields) -> dict:
    """A /v1/completions body for MODEL: "Hello", 4 tokens, unless `fields` say otherwise."""
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`dfastllm serve --model model_dir *args` (no --model: the embedded
    default model), output in `log_path`. The environment is the test's
    without DFASTLLM_* settings, plus `env`. `launcher`: the command that
    stands for `dfastllm` (default `python -m dfastllm.cli`); `cwd`: the
    folder it starts in."""

    def __init__(self, model_dir: str | None, log_path: str, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, launcher: list[str] | None = None, cwd=None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = str(log_path)
        model = ["--model", model_dir] if model_dir else []
        argv = [*(launcher or [sys.executable, "-m", "dfastllm.cli"]), "serve", *model, "--port", str(self.port),
                "--log-format", "text", *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("DFASTLLM_")}
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**environment, **(env or {})}, cwd=cwd)
        self.segment_prefix = f"dfastllm-{self.process.pid}-"

    def readiness(self) -> int | None:
        """The status of /health/ready; None while nothing answers on the port
        (starting, or its HTTP server restarting)."""
        try:
            return httpx.get(self.base_url + "/health/ready", timeout=2).status_code
        except httpx.TransportError:
            return None

    def wait_ready(self, timeout: float = 120) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dfastllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.readiness() == 200:
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"dfastllm serve not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the supervisor; -> its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")

    def log_records(self) -> list[dict]:
        """The JSON records of every process (with --log-format json; lines
        that are not JSON, such as a library's print, are skipped)."""
        records = []
        with open(self.log_path, "rb") as f:
            for line in f.read().splitlines():
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    def engine_pid(self) -> int:
        for child in children(self.process.pid):
            if b"dfastllm.engine.process" in cmdline(child):
                return child
        raise AssertionError("no engine process under the supervisor")

    def worker_pids(self) -> set[int]:
        """The Granian workers (children of Granian, grandchildren of the supervisor)."""
        return {pid for child in children(self.process.pid) if b"server.launch" in cmdline(child)
                for pid in children(child)}

    def segments(self) -> list[str]:
        """This run's shared-memory segments still in /dev/shm."""
        return [name for name in os.listdir("/dev/shm") if name.startswith(self.segment_prefix)]


@contextlib.contextmanager
def serving(model_dir: str | None, log_path: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 150, **process):
    """A ready `ServeProcess(model_dir, log_path, *args, **process)`, stopped
    on leaving; a server that does not then exit 0 fails the test."""
    serve = ServeProcess(model_dir, log_path, *args, env=env, **process)
    try:
        serve.wait_ready(timeout)
        yield serve
    finally:
        code = serve.stop()
    assert code == 0, f"dfastllm serve exited with {code}:\n{serve.log_tail()}"


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text page as {series: value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metrics(serve: ServeProcess, headers: dict | None = None) -> dict[str, float]:
    """The /metrics page as {series: value}."""
    return parse_metrics(httpx.get(serve.base_url + "/metrics", headers=headers, timeout=30).text)


def metric(values: dict, name: str) -> float:
    """The sum of a metric's series (all label sets) in `metrics()`'s result."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def wait_for(condition, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
