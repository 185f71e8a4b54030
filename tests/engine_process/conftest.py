"""A real engine process on a tiny checkpoint, started through the
supervisor's own functions (no HTTP), and helpers to talk to it."""

import asyncio
import os
import subprocess
import sys
import threading

import pytest

from dfastllm.config import ServerConfig
from dfastllm.ipc import IpcLayout
from dfastllm.supervisor import Supervisor
from dfastllm.testing import write_tiny_llada

CLIENT_PROCESS = os.path.join(os.path.dirname(__file__), "client_process.py")


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory):
    return write_tiny_llada(tmp_path_factory.mktemp("tiny-llada"), seed=21)


def engine_config(model_dir: str, **overrides) -> ServerConfig:
    """Two workers' worth of slots, no warm-up (the tests warm nothing up and
    an engine restart should be quick)."""
    values = dict(model=model_dir, workers=2, warmup=False, log_format="text", max_batch_size=16)
    return ServerConfig(**{**values, **overrides})


class RunningEngine:
    """A supervisor with its engine process READY, supervised by a thread."""

    def __init__(self, config: ServerConfig, *, supervise: bool = True):
        self.supervisor = Supervisor(config, http=False)
        self.supervisor.start()
        if not self.supervisor.wait_ready(90):
            self.supervisor.stop()
            raise RuntimeError("the engine process did not become ready")
        self.base_name = self.supervisor.layout.base_name
        self._thread = None
        if supervise:
            self.supervise()

    def supervise(self) -> None:
        """Watch the engine from a thread (restarts after a crash)."""
        self._thread = threading.Thread(target=self.supervisor.supervise, daemon=True)
        self._thread.start()

    def layout(self) -> IpcLayout:
        return IpcLayout.attach(self.base_name)

    def segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(self.base_name)]

    def stop(self) -> None:
        self.supervisor.stop_requested.set()
        if self._thread is not None:
            self._thread.join()
        self.supervisor.stop()


@pytest.fixture(scope="module")
def engine(tiny_llada_dir):
    running = RunningEngine(engine_config(tiny_llada_dir))
    yield running
    running.stop()


def start_client_process(base_name: str, mode: str, requests_json: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CLIENT_PROCESS, base_name, mode, requests_json],
                            stdout=subprocess.PIPE, text=True)


async def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
