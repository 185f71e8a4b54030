"""Shared by the engine-process tests: a supervised engine process, worker
processes, random requests and the offline reference."""

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading

from dfastllm import LLM, SamplingParams
from dfastllm.config import ServerConfig
from dfastllm.engine.client import EngineClient, TokensEvent
from dfastllm.ipc import IpcLayout
from dfastllm.supervisor import Supervisor

CLIENT_PROCESS = os.path.join(os.path.dirname(__file__), "client_process.py")


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


def start_client_process(base_name: str, mode: str, requests_json: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CLIENT_PROCESS, base_name, mode, requests_json],
                            stdout=subprocess.PIPE, text=True)


@contextlib.asynccontextmanager
async def attached_client(layout: IpcLayout):
    """An EngineClient of `layout`, started; closed on leaving."""
    client = EngineClient(layout)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


# A canvas of 4 + 400 tokens at one token per step: a few seconds on the tiny
# model, long enough to still be running whatever a test does meanwhile;
# blocks of 4, so the first tokens come out within 4 steps.
LONG = dict(max_tokens=400, block_length=4)


def random_requests(rng: random.Random, prefix: str, n: int) -> list[dict]:
    """Prompts of ordinary ids (special tokens have the lowest ids) and a mix
    of decoding modes; sampling only with a seed, so the output is defined."""
    modes = [dict(), dict(threshold=0.3), dict(remasking="random", seed=rng.randrange(2**62)),
             dict(temperature=0.8, seed=rng.randrange(2**62)), dict(steps=None, block_length=8)]
    requests = []
    for i in range(n):
        max_tokens = rng.choice([8, 16, 24, 40])
        params = dict(max_tokens=max_tokens, block_length=rng.choice([8, max_tokens]),
                      steps=max_tokens // 2, ignore_eos=rng.random() < 0.5)
        params.update(modes[i % len(modes)])
        prompt = [rng.randrange(20, 320) for _ in range(rng.randrange(1, 30))]
        requests.append({"id": f"{prefix}-{i}", "prompt": prompt, "params": params})
    return requests


def offline(model_dir: str, requests: list[dict]) -> dict:
    llm = LLM(model_dir, device="cpu")
    outputs = llm.generate([r["prompt"] for r in requests], [SamplingParams(**r["params"]) for r in requests])
    return {r["id"]: (o.token_ids, o.finish_reason) for r, o in zip(requests, outputs)}


async def read_all(stream) -> tuple[list[int], object]:
    tokens = []
    async for event in stream:
        if isinstance(event, TokensEvent):
            tokens += event.ids
        else:
            return tokens, event
