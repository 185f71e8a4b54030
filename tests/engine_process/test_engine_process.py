"""The engine process end to end: a real `python -m dfastllm.engine.process`
on a tiny checkpoint, started by the supervisor's functions, with clients in
this process (EngineClient) and in separate worker processes."""

import asyncio
import dataclasses
import json
import os
import random
import signal
import threading
import time

import pytest

from dfastllm import SamplingParams
from dfastllm.engine.client import (EngineClient, EngineRejected, EngineUnavailable, ErrorEvent, FinishedEvent,
                                    TokensEvent)
from dfastllm.ipc import EngineState
from dfastllm.ipc.control import SlotState
from dfastllm.ipc.messages import FinishReason, RejectReason, Tokens, choice_id, decode
from dfastllm.supervisor import Supervisor
from dfastllm.testing import write_tiny_llada

from .helpers import (LONG, RunningEngine, attached_client, engine_config, offline, random_requests, read_all,
                      start_client_process, wait_until)


@pytest.mark.timeout(120)
def test_two_worker_processes_get_the_offline_tokens(engine, tiny_llada_dir):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    batches = [random_requests(rng, f"w{w}-{seed}", 12) for w in range(2)]
    workers = [start_client_process(engine.base_name, "generate", json.dumps(b)) for b in batches]
    results = {}
    for worker in workers:
        out, _ = worker.communicate(timeout=90)
        assert worker.returncode == 0
        results.update(json.loads(out))
    expected = offline(tiny_llada_dir, batches[0] + batches[1])
    assert len(results) == 24
    for rid, (tokens, finish_reason) in expected.items():
        assert results[rid]["tokens"] == tokens, f"{rid} (seed {seed})"
        assert results[rid]["finish_reason"] == finish_reason
        assert results[rid]["completion_tokens"] == len(tokens)


@pytest.mark.timeout(60)
def test_cancel_stops_the_request_within_one_step(engine):
    async def main():
        client = EngineClient(engine.layout())
        frames = []  # every answer the engine sent this worker, decoded
        on_batch = client._on_batch
        client._on_batch = lambda batch: (frames.extend(decode(f) for f in batch), on_batch(batch))
        await client.start()
        try:
            stream = await client.submit("cancel-me", [40, 41, 42, 43], SamplingParams(**LONG))
            first = await anext(stream)
            assert isinstance(first, TokensEvent) and first.ids
            assert await client.cancel("cancel-me") is True
            tokens, final = await read_all(stream)
            assert isinstance(final, FinishedEvent) and final.reason == "cancelled"
            assert final.completion_tokens == len(first.ids) + len(tokens)
            assert final.completion_tokens < LONG["max_tokens"]
            assert await wait_until(lambda: client.state().running == 0, 0.5)
            await asyncio.sleep(0.2)  # room for any stray output to arrive
            ours = [m for m in frames if getattr(m, "request_id", None) == "cancel-me"]
            last = max(i for i, m in enumerate(ours) if m.KIND.name == "FINISHED")
            assert last == len(ours) - 1, "a message followed FINISHED"
            assert ours[last].reason == FinishReason.CANCELLED
            assert sum(len(m.token_ids) for m in ours if isinstance(m, Tokens)) == final.completion_tokens
            assert await client.cancel("cancel-me") is False  # already over
            assert await client.cancel("never-submitted") is False
        finally:
            await client.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_cancelling_all_choices_finds_those_still_running(engine):
    # DELETE's case: the request's first choice is over, the others still run.
    async def main():
        async with attached_client(engine.layout()) as client:
            streams = [await client.submit(choice_id("multi", i), [40 + i, 41], SamplingParams(**LONG))
                       for i in range(3)]
            other = await client.submit("multi-other", [50, 51], SamplingParams(**LONG))
            assert await client.cancel("multi") is True  # the first choice alone
            assert (await read_all(streams[0]))[1].reason == "cancelled"
            assert await client.cancel("multi") is False
            assert await client.cancel("multi", all_choices=True) is True
            for stream in streams[1:]:
                assert (await read_all(stream))[1].reason == "cancelled"
            assert await client.cancel("multi", all_choices=True) is False
            assert await client.cancel("multi-other") is True, "a request whose id only starts alike runs on"
            assert (await read_all(other))[1].reason == "cancelled"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_leaving_a_stream_early_cancels_the_request(engine):
    async def main():
        async with attached_client(engine.layout()) as client:
            stream = await client.submit("abandoned", [50, 51, 52], SamplingParams(**LONG))
            await anext(stream)
            await stream.aclose()
            assert await wait_until(lambda: client.state().running == 0, 1.0)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_refusals_reach_the_submitter_and_do_not_consume_the_id(engine):
    async def main():
        async with attached_client(engine.layout()) as client:
            with pytest.raises(EngineRejected) as refused:
                await client.submit("retry-me", [60] * 200, SamplingParams(max_tokens=400))
            assert refused.value.reason == RejectReason.INVALID and "max_model_len" in refused.value.message
            stream = await client.submit("retry-me", [60, 61], SamplingParams(max_tokens=8))
            tokens, final = await read_all(stream)
            assert isinstance(final, FinishedEvent) and final.completion_tokens == len(tokens)
            with pytest.raises(EngineRejected) as duplicate:
                await client.submit("retry-me", [60, 61], SamplingParams(max_tokens=8))
            assert duplicate.value.reason == RejectReason.DUPLICATE_ID

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_killed_worker_process_gets_its_requests_cancelled(engine):
    requests = [{"id": f"orphan-{i}", "prompt": [70 + i, 71, 72], "params": LONG} for i in range(3)]
    worker = start_client_process(engine.base_name, "hold", json.dumps(requests))
    try:
        assert worker.stdout.readline().strip() == "admitted"
        control = engine.layout().control
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and control.snapshot().running + control.snapshot().queue_depth < 3:
            time.sleep(0.01)
        assert control.snapshot().running + control.snapshot().queue_depth == 3
        worker_slots = [i for i, s in enumerate(control.slots()) if s.pid == worker.pid]
        assert len(worker_slots) == 1
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and (control.snapshot().running or control.snapshot().queue_depth):
        time.sleep(0.01)
    assert control.snapshot().running == 0 and control.snapshot().queue_depth == 0
    assert control.slot(worker_slots[0]).state == SlotState.FREE


@pytest.mark.timeout(60)
def test_runtime_settings_from_the_control_block_apply_to_new_requests(engine):
    """PATCH /admin/config writes the whole ServerConfig as JSON into the
    control block; the engine picks up request_timeout_s and max_queue."""
    control = engine.layout().control
    original = engine.supervisor.config
    control.write_config(dataclasses.replace(original, request_timeout_s=0.3).to_json().encode())
    time.sleep(0.5)  # the engine looks at the config version at least every 0.25 s

    async def main():
        async with attached_client(engine.layout()) as client:
            started = time.monotonic()
            tokens, final = await read_all(await client.submit("past-deadline", [45, 46], SamplingParams(**LONG)))
            return tokens, final, time.monotonic() - started

    try:
        tokens, final, seconds = asyncio.run(main())
    finally:
        control.write_config(original.to_json().encode())
    assert isinstance(final, FinishedEvent) and final.reason == "cancelled"
    assert final.completion_tokens == len(tokens) < LONG["max_tokens"]
    assert seconds < 2.0


@pytest.mark.timeout(30)
def test_engine_metrics_reach_the_multiprocess_directory(engine):
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    async def main():
        async with attached_client(engine.layout()) as client:
            await read_all(await client.submit("metered", [80, 81], SamplingParams(max_tokens=8)))

    asyncio.run(main())
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=engine.supervisor.metrics_dir)
    assert registry.get_sample_value("dfastllm:denoising_steps_total") >= 8
    assert registry.get_sample_value("dfastllm:denoising_steps_prepared_ahead_total") >= 7  # all but the first
    assert registry.get_sample_value("dfastllm:tokens_per_step_count") >= 1
    assert registry.get_sample_value("dfastllm:request_queue_time_seconds_count") >= 1
    assert registry.get_sample_value("dfastllm:device_memory_used_bytes") > 0


def run_until_restarted(config, scenario, *, supervise: bool = True) -> None:
    """`scenario(running, client)` makes the engine fail; then the supervisor
    must have started exactly one new engine, which is READY and generates,
    and every segment must go at stop."""
    running = RunningEngine(config, supervise=supervise)
    try:
        async def main():
            async with attached_client(running.layout()) as client:
                generation = client.state().generation
                await scenario(running, client)
                assert await wait_until(lambda: client.state().generation == generation + 1
                                        and client.state().state == EngineState.READY, 60, 0.05)
                tokens, final = await read_all(await client.submit("reborn", [90, 91], SamplingParams(max_tokens=8)))
                assert isinstance(final, FinishedEvent) and len(tokens) == final.completion_tokens

        asyncio.run(main())
        assert running.supervisor.engine_starts == 2
    finally:
        running.stop()
    assert running.segments() == []


@pytest.mark.timeout(120)
def test_killed_engine_fails_open_requests_within_a_second_and_is_restarted(tiny_llada_dir):
    async def scenario(running, client):
        streams = [await client.submit(f"doomed-{i}", [90 + i, 91], SamplingParams(**LONG)) for i in range(4)]
        killed_at = time.monotonic()
        os.kill(running.supervisor.engine.pid, signal.SIGKILL)
        finals = await asyncio.wait_for(asyncio.gather(*(read_all(s) for s in streams)), 5)
        ended_after = time.monotonic() - killed_at
        assert all(isinstance(final, ErrorEvent) and final.engine_failed for _, final in finals)
        assert ended_after < 1.0
        with pytest.raises(EngineUnavailable):
            await client.submit("too-early", [90], SamplingParams(max_tokens=4))
        running.supervise()  # the supervisor sees the death and restarts the engine

    # No supervision at first: the workers must notice by the heartbeat alone.
    run_until_restarted(engine_config(tiny_llada_dir), scenario, supervise=False)


@pytest.mark.timeout(120)
def test_a_stalled_engine_is_killed_and_restarted(tiny_llada_dir):
    async def scenario(running, client):
        await asyncio.sleep(1.5)  # an idle loop comes round well within the limit
        assert running.supervisor.engine_starts == 1
        stream = await client.submit("stalled", [90, 91], SamplingParams(**LONG))
        assert isinstance(await anext(stream), TokensEvent)
        stalled = running.supervisor.engine
        os.kill(stalled.pid, signal.SIGSTOP)  # alive, but nothing in it moves
        _, final = await asyncio.wait_for(read_all(stream), 5)
        assert isinstance(final, ErrorEvent) and final.engine_failed
        assert await wait_until(lambda: stalled.returncode == -signal.SIGKILL, 30, 0.05)

    run_until_restarted(engine_config(tiny_llada_dir, engine_stall_timeout_s=1.0), scenario)


@pytest.mark.timeout(90)
def test_stop_drains_running_requests_then_removes_every_segment(tmp_path):
    # The drain timeout sits between the short request's 4 steps and the
    # endless one's 3000 (steps over a 3002-token canvas: tens of ms each even
    # on an idle machine, so it cannot finish within the 3 s drain).
    model_dir = write_tiny_llada(tmp_path, seed=21, max_sequence_length=4096)
    running = RunningEngine(engine_config(model_dir, drain_timeout_s=3.0))
    engine_process = running.supervisor.engine
    try:
        async def main():
            async with attached_client(running.layout()) as client:
                short = await client.submit("finishes", [100, 101], SamplingParams(max_tokens=4, ignore_eos=True))
                endless = await client.submit("outlives-drain", [100, 102],
                                              SamplingParams(max_tokens=3000, block_length=3000, ignore_eos=True))
                stopping = asyncio.get_running_loop().run_in_executor(None, running.stop)
                assert await wait_until(lambda: client.state().state == EngineState.DRAINING, 2)
                with pytest.raises(EngineUnavailable):
                    await client.submit("late", [100], SamplingParams(max_tokens=4))
                tokens, final = await read_all(short)
                assert isinstance(final, FinishedEvent) and final.reason == "length" and len(tokens) == 4
                _, final = await read_all(endless)
                assert isinstance(final, ErrorEvent) and not final.engine_failed
                assert "shut down" in final.message
                await stopping

        asyncio.run(main())
    finally:
        running.stop()
    assert engine_process.returncode == 0
    assert running.segments() == []


@pytest.mark.timeout(60)
def test_supervisor_gives_up_at_once_on_a_checkpoint_it_cannot_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-diffusion-model"}))
    supervisor = Supervisor(engine_config(str(tmp_path)), http=False)
    supervisor.start()
    base_name = supervisor.layout.base_name
    try:
        assert supervisor.supervise() == 1
        assert supervisor.engine_starts == 1  # a restart could not help
        assert "not-a-diffusion-model" in supervisor.failure_message
        assert supervisor.layout.control.state == EngineState.FAILED
    finally:
        supervisor.stop()
    assert [n for n in os.listdir("/dev/shm") if n.startswith(base_name)] == []


@pytest.mark.timeout(60)
def test_supervisor_gives_up_after_load_retries_crashes_before_ready(tiny_llada_dir):
    supervisor = Supervisor(engine_config(tiny_llada_dir, load_retries=1), http=False)
    supervisor.start()
    outcome = []
    watcher = threading.Thread(target=lambda: outcome.append(supervisor.supervise()))
    watcher.start()
    try:
        killed = set()
        while watcher.is_alive():  # every engine dies while still loading
            engine = supervisor.engine
            if engine is not None and engine.pid not in killed:
                os.kill(engine.pid, signal.SIGKILL)
                killed.add(engine.pid)
            time.sleep(0.01)
        assert outcome == [1]
        assert supervisor.engine_starts == len(killed) == 2
        assert supervisor.layout.control.state == EngineState.FAILED
    finally:
        supervisor.stop_requested.set()
        watcher.join()
        supervisor.stop()
