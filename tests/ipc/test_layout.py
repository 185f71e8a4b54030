"""The whole IPC path with real processes: worker processes on asyncio
(claim a slot from $DFASTLLM_IPC_NAME, submit, stream results back) and an
engine loop in the test process (doorbell, slot table, dead-owner reclaim)."""

import asyncio
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from dfastllm._ipc import Segment
from dfastllm.ipc import ENV_NAME, IpcLayout, remove_stale_segments
from dfastllm.ipc.channels import WorkerChannels
from dfastllm.ipc.control import EngineState, SlotState
from dfastllm.ipc.messages import Finished, FinishReason, Submit, Tokens, decode, encode
from dfastllm.ipc.ring import AsyncRingReader, AsyncRingWriter
from dfastllm.sampling_params import SamplingParams

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def layout(base_name):
    layout = IpcLayout.create(base_name, 3, ring_capacity=8192)
    yield layout
    layout.unlink()


def worker(n_requests: int, results) -> None:
    async def main():
        endpoint = IpcLayout.attach().claim_worker_slot()  # base name from the environment
        writer = AsyncRingWriter(endpoint.requests)
        events = asyncio.Queue()
        reader = AsyncRingReader(endpoint.responses, lambda batch: [events.put_nowait(decode(m)) for m in batch])
        reader.start()
        for i in range(n_requests):
            prompt = [endpoint.slot, i, 1000 + i]
            await writer.put(encode(Submit(f"s{endpoint.slot}-{i}", endpoint.slot, prompt, SamplingParams())), 10)
        tokens, finished = {}, 0
        while finished < n_requests:
            msg = await asyncio.wait_for(events.get(), 20)
            if isinstance(msg, Tokens):
                tokens.setdefault(msg.request_id, []).extend(msg.token_ids)
            else:
                assert isinstance(msg, Finished) and msg.reason == FinishReason.STOP
                finished += 1
        reader.stop()
        endpoint.release()
        results.put((endpoint.slot, tokens))

    asyncio.run(main())


def serve(channels: WorkerChannels, until, timeout: float = 30) -> list[int]:
    """A minimal engine loop: answer each SUBMIT with its prompt reversed.
    Returns the slots detached meanwhile."""
    deadline = time.monotonic() + timeout
    detached_slots = []
    while not until():
        assert time.monotonic() < deadline, "engine loop timed out"
        _, detached = channels.refresh(check_owners=True)
        detached_slots += [channel.slot for channel in detached]
        for channel, frame in channels.receive():
            msg = decode(frame)
            assert isinstance(msg, Submit) and msg.worker_slot == channel.slot
            channel.responses.send(encode(Tokens(msg.request_id, msg.prompt_token_ids[::-1])))
            channel.responses.send(encode(Finished(msg.request_id, FinishReason.STOP, 3, 3, 1, 0.0, 0.0)))
        channels.flush()
        channels.wait(timeout=0.1)
    return detached_slots


@pytest.mark.timeout(90)
def test_workers_and_engine_end_to_end(layout, monkeypatch):
    monkeypatch.setenv(ENV_NAME, layout.base_name)
    engine = IpcLayout.attach()
    engine.control.engine_started()
    channels = WorkerChannels(engine)
    results = SPAWN.Queue()
    workers = [SPAWN.Process(target=worker, args=(300, results)) for _ in range(2)]
    for w in workers:
        w.start()
    got = []

    def both_done():
        while not results.empty():
            got.append(results.get())
        return len(got) == 2

    try:
        detached = serve(channels, both_done)
        for w in workers:
            w.join(10)
            assert w.exitcode == 0
        for slot, tokens in got:
            assert tokens == {f"s{slot}-{i}": [1000 + i, i, slot] for i in range(300)}
        # Both released their slots: the engine detaches them and frees the slots.
        attached, detached_now = channels.refresh()
        assert not attached and sorted(detached + [c.slot for c in detached_now]) == sorted(s for s, _ in got)
        assert all(info.state == SlotState.FREE for info in engine.control.slots())
    finally:
        for w in workers:
            w.kill()


def submit_and_die(results) -> None:
    endpoint = IpcLayout.attach().claim_worker_slot()
    endpoint.requests.put(encode(Submit("orphan", endpoint.slot, [1], SamplingParams())))
    endpoint.requests.put(encode(Submit("orphan-2", endpoint.slot, [2], SamplingParams())))
    results.put(endpoint.slot)
    results.close()
    results.join_thread()  # flushed before the crash below
    os._exit(1)  # no release: a crash


@pytest.mark.timeout(60)
def test_dead_worker_is_detached_and_its_slot_reclaimed(layout, monkeypatch):
    monkeypatch.setenv(ENV_NAME, layout.base_name)
    channels = WorkerChannels(IpcLayout.attach())
    results = SPAWN.Queue()
    child = SPAWN.Process(target=submit_and_die, args=(results,))
    child.start()
    slot = results.get(timeout=20)
    attached, _ = channels.refresh(check_owners=False)  # the engine saw the claim
    assert [c.slot for c in attached] == [slot]
    assert decode(channels.receive(max_per_worker=1)[0][1]).request_id == "orphan"
    channels.by_slot[slot].responses.send(b"for the dead")
    child.join(10)
    _, detached = channels.refresh(check_owners=True)
    assert [c.slot for c in detached] == [slot]  # the engine drops its requests now
    assert layout.control.slot(slot).state == SlotState.FREE
    assert layout.request_ring(slot).get_nowait() is None  # "orphan-2" was dropped
    assert layout.response_ring(slot).get_nowait() is None
    # The freed slot serves the next worker with empty rings.
    slot_again, _ = layout.control.claim_slot(pid=os.getpid())
    assert slot_again == slot


@pytest.mark.timeout(60)
def test_engine_doorbell_wakes_on_any_ring_and_on_state_change(layout):
    engine = IpcLayout.attach(layout.base_name)
    channels = WorkerChannels(engine)
    for slot in range(3):
        engine.control.claim_slot(pid=os.getpid())
    channels.refresh()
    start = time.monotonic()
    assert channels.wait(timeout=0.2) is False
    assert 0.15 < time.monotonic() - start < 2.0

    # Idle, then a put into the last worker's ring wakes the one doorbell.
    other = IpcLayout.attach(layout.base_name)
    putter = SPAWN.Process(target=_put_into, args=(layout.base_name, 2, 0.3))
    putter.start()
    cpu = time.process_time()
    start = time.monotonic()
    assert channels.wait(timeout=20) is True
    assert time.monotonic() - start < 10 and time.process_time() - cpu < 0.05
    assert channels.receive() and channels.receive() == []
    putter.join(10)

    # A state change (the supervisor asks for a drain) wakes it too.
    timer = SPAWN.Process(target=_set_state_after, args=(layout.base_name, 0.2))
    timer.start()
    start = time.monotonic()
    assert channels.wait(timeout=20) is False
    assert time.monotonic() - start < 10
    assert other.control.state == EngineState.DRAINING
    timer.join(10)


def _put_into(base: str, slot: int, delay: float) -> None:
    time.sleep(delay)
    IpcLayout.attach(base).request_ring(slot).put(b"wake up")


def _set_state_after(base: str, delay: float) -> None:
    time.sleep(delay)
    IpcLayout.attach(base).control.set_state(EngineState.DRAINING)


def test_unlink_leaves_nothing_in_dev_shm(base_name):
    layout = IpcLayout.create(base_name, 4, ring_capacity=4096, config=b'{"max_queue": 8}')
    names = sorted(n for n in os.listdir("/dev/shm") if n.startswith(base_name))
    assert names == sorted(layout.segment_names()) and len(names) == 1 + 2 * 4
    assert IpcLayout.attach(base_name).control.read_config() == (1, b'{"max_queue": 8}')
    layout.unlink()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(base_name)]


def test_failed_create_cleans_up_what_it_made(base_name):
    Segment.create(f"{base_name}-rsp1", 4096)  # a name in the way
    try:
        with pytest.raises(FileExistsError):
            IpcLayout.create(base_name, 3, ring_capacity=4096)
        assert sorted(n for n in os.listdir("/dev/shm") if n.startswith(base_name)) == [f"{base_name}-rsp1"]
    finally:
        Segment.unlink(f"{base_name}-rsp1")


def test_attach_errors(base_name, monkeypatch):
    monkeypatch.delenv(ENV_NAME, raising=False)
    with pytest.raises(RuntimeError, match=ENV_NAME):
        IpcLayout.attach()
    with pytest.raises(ValueError, match="base name"):
        IpcLayout.attach("bad/name")
    with pytest.raises(FileNotFoundError):
        IpcLayout.attach(base_name)


def test_remove_stale_segments_spares_live_runs(base_name):
    dead = SPAWN.Process(target=os.getpid)
    dead.start()
    dead.join()
    prefix = f"{base_name}-run"
    stale = [f"{prefix}-{dead.pid}-abcd-ctl", f"{prefix}-{dead.pid}-abcd-req0"]
    live = [f"{prefix}-{os.getpid()}-beef-ctl", f"{prefix}-x-not-a-pid"]
    for name in stale + live:
        Segment.create(name, 4096)
    try:
        assert remove_stale_segments(prefix) == sorted(stale)
        assert sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix)) == sorted(live)
    finally:
        for name in stale + live:
            Segment.unlink(name)


def test_ipc_imports_no_torch():
    code = ("import sys, dfastllm.ipc, dfastllm.ipc.channels, dfastllm.ipc.messages, dfastllm.ipc.ring; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
