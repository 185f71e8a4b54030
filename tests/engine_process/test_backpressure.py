"""A worker that stops reading: its response ring fills, the engine keeps its
answers in a backlog (nothing lost) and goes on serving the other workers.

The engine process is started directly (`python -m dfastllm.engine.process`)
on segments this test creates with tiny rings, so a few requests fill them.
"""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from dfastllm import SamplingParams
from dfastllm.config import CONFIG_ENV
from dfastllm.engine.client import FinishedEvent
from dfastllm.ipc import EngineState, IpcLayout, new_base_name

from .helpers import attached_client, engine_config, offline, random_requests, read_all, start_client_process

RING_CAPACITY = 4096  # about a hundred TOKENS messages


@pytest.fixture
def small_ring_engine(tiny_llada_dir):
    config = engine_config(tiny_llada_dir)
    layout = IpcLayout.create(new_base_name("dfastllm-test"), n_slots=4, ring_capacity=RING_CAPACITY,
                              config=config.to_json().encode())
    engine = subprocess.Popen([sys.executable, "-m", "dfastllm.engine.process"],
                              env={**os.environ, CONFIG_ENV: config.to_json(), **layout.env()})
    try:
        deadline = time.monotonic() + 90
        while layout.control.state != EngineState.READY and time.monotonic() < deadline:
            assert engine.poll() is None, "the engine process exited"
            time.sleep(0.05)
        assert layout.control.state == EngineState.READY
        yield layout, engine
    finally:
        engine.terminate()
        engine.wait(30)
        layout.unlink()


@pytest.mark.timeout(120)
def test_a_stalled_worker_loses_nothing_and_blocks_no_one(small_ring_engine, tiny_llada_dir):
    layout, engine = small_ring_engine
    seed = random.randrange(2**32)
    requests = random_requests(random.Random(seed), f"stalled-{seed}", 6)
    for r in requests:  # blocks of 2, a token per step: a TOKENS message every other step per request
        r["params"].update(max_tokens=64, steps=64, block_length=2, threshold=None, ignore_eos=True)
    worker = start_client_process(layout.base_name, "generate", json.dumps(requests))
    try:
        deadline = time.monotonic() + 30
        while layout.control.snapshot().running < len(requests) and time.monotonic() < deadline:
            time.sleep(0.005)
        worker.send_signal(signal.SIGSTOP)  # it stops reading its response ring
        stalled_ring = layout.response_ring(next(i for i, s in enumerate(layout.control.slots())
                                                 if s.pid == worker.pid))
        deadline = time.monotonic() + 30
        while stalled_ring.used_bytes < RING_CAPACITY * 3 // 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert stalled_ring.used_bytes >= RING_CAPACITY * 3 // 4  # full: the engine holds the rest back

        async def other_worker():
            async with attached_client(IpcLayout.attach(layout.base_name)) as client:
                started = time.monotonic()
                tokens, final = await read_all(await client.submit("unhindered", [40, 41, 42],
                                                                   SamplingParams(max_tokens=16)))
                return tokens, final, time.monotonic() - started

        tokens, final, seconds = asyncio.run(other_worker())
        assert isinstance(final, FinishedEvent) and len(tokens) == final.completion_tokens
        assert seconds < 10
    finally:
        worker.send_signal(signal.SIGCONT)
    out, _ = worker.communicate(timeout=60)
    results = json.loads(out)
    for rid, (expected, finish_reason) in offline(tiny_llada_dir, requests).items():
        assert results[rid]["tokens"] == expected, f"{rid} (seed {seed})"
        assert results[rid]["finish_reason"] == finish_reason
    assert engine.poll() is None
