"""What the engine-side hardening tests share: a real `dfastllm serve`
(supervisor, engine process, Granian with two workers) on a tiny checkpoint,
started with the flags and environment a test needs, its JSON log, and the
processes it runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import orjson

from dfastllm.testing import write_tiny_llada

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(directory) -> str:
    return write_tiny_llada(directory / "tiny", seed=5, max_sequence_length=512)


class EngineServer:
    """`dfastllm serve --workers 2` with JSON logs in `directory/serve.log`.
    The environment is the test's without DFASTLLM_* settings, plus `env`;
    one intra-op thread, so that a shared 2-core machine does not turn the
    engine's thread barriers into seconds-long stalls."""

    def __init__(self, directory, *args: str, model: str | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = str(directory / "serve.log")
        model = model or tiny_checkpoint(directory)
        argv = [sys.executable, "-m", "dfastllm.cli", "serve", "--model", model, "--served-model-name", MODEL,
                "--port", str(self.port), "--workers", "2", "--log-format", "json", *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("DFASTLLM_")}
        environment.update(OMP_NUM_THREADS="1", **(env or {}))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        self.segment_prefix = f"dfastllm-{self.process.pid}-"

    def wait_ready(self, timeout: float = 120) -> EngineServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dfastllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"dfastllm serve not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the supervisor, as a service manager sends; -> its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_records(self) -> list[dict]:
        """The JSON records of every process (lines that are not JSON, such as
        a library's print, are skipped)."""
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

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")

    def engine_pid(self) -> int:
        for child in children(self.process.pid):
            if b"dfastllm.engine.process" in cmdline(child):
                return child
        raise AssertionError("no engine process under the supervisor")

    def segments(self) -> list[str]:
        """This run's shared-memory segments still in /dev/shm."""
        return [name for name in os.listdir("/dev/shm") if name.startswith(self.segment_prefix)]


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


def metrics(server: EngineServer) -> dict[str, float]:
    values = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **fields}


def wait_for(condition, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
