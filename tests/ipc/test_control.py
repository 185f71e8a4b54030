import json
import multiprocessing
import os
import threading
import time

import pytest

from dfastllm.ipc.control import ControlBlock, EngineState, NoFreeSlot, SlotInfo, SlotState, pid_alive

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def control(base_name):
    block = ControlBlock.create(base_name, 8)
    yield block
    block.unlink()


def test_engine_state_heartbeat_and_load(control, base_name):
    worker_view = ControlBlock.attach(base_name)
    snap = worker_view.snapshot()
    assert snap.state == EngineState.STOPPED and snap.generation == 0

    assert control.engine_started(pid=4242) == 1
    control.set_state(EngineState.READY)
    control.publish_load(queue_depth=7, running=3)
    control.publish_device_memory(used=5 << 30, total=80 << 30)
    snap = worker_view.snapshot()
    assert (snap.state, snap.generation, snap.pid) == (EngineState.READY, 1, 4242)
    assert (snap.queue_depth, snap.running, snap.device_memory_used, snap.device_memory_total) == \
        (7, 3, 5 << 30, 80 << 30)
    assert 0 <= snap.heartbeat_age < 1.0
    time.sleep(0.2)
    assert worker_view.heartbeat_age() >= 0.2
    control.beat()
    assert worker_view.heartbeat_age() < 0.2
    assert control.engine_started() == 2  # a restart is visible as a new generation
    assert worker_view.state == EngineState.LOADING


def test_attach_errors(base_name):
    with pytest.raises(FileNotFoundError):
        ControlBlock.attach(base_name)
    from dfastllm._ipc import Segment
    Segment.create(base_name, 4096)
    try:
        with pytest.raises(ValueError, match="not a dfastllm control block"):
            ControlBlock.attach(base_name)
    finally:
        Segment.unlink(base_name)


def test_slot_word_packs_state_pid_generation():
    info = SlotInfo(SlotState.CLAIMED, 4_000_000, 2**32 - 1)
    assert SlotInfo.from_word(info.word) == info


def test_claim_release_reclaim_cycle(control):
    slot, generation = control.claim_slot(pid=os.getpid())
    assert control.slot(slot) == SlotInfo(SlotState.CLAIMED, os.getpid(), generation)
    assert control.release_slot(slot, generation + 1) is False  # not this claim
    assert control.release_slot(slot, generation) is True
    assert control.slot(slot).state == SlotState.RELEASED
    assert control.claim_slot(pid=1)[0] != slot  # not FREE until the engine reclaimed it
    assert control.begin_reclaim(slot, control.slot(slot))
    control.finish_reclaim(slot)
    again, new_generation = control.claim_slot(pid=2)
    assert again == slot and new_generation == generation + 1
    stale = SlotInfo(SlotState.CLAIMED, 2, generation)
    assert control.begin_reclaim(slot, stale) is False  # changed since seen


def claim_until_full(name: str, first_fake_pid: int, start, results) -> None:
    control = ControlBlock.attach(name)
    start.wait()
    mine = []
    pid = first_fake_pid
    try:
        while True:
            mine.append(control.claim_slot(pid=pid)[0])
            pid += 1
    except NoFreeSlot:
        results.put((first_fake_pid, mine))


@pytest.mark.timeout(60)
def test_concurrent_claims_from_processes_never_share_a_slot(base_name):
    control = ControlBlock.create(base_name, 512)
    start, results = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=claim_until_full, args=(base_name, 1000 * (i + 1), start, results))
             for i in range(4)]
    try:
        for p in procs:
            p.start()
        start.set()  # all race for the slots at once
        claimed = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        flat = sorted(s for _, mine in claimed for s in mine)
        assert flat == list(range(512))  # every slot exactly once
        for first_pid, mine in claimed:  # owned by the claim that won it
            assert [control.slot(slot).pid for slot in mine] == list(range(first_pid, first_pid + len(mine)))
        with pytest.raises(NoFreeSlot):
            control.claim_slot()
    finally:
        for p in procs:
            p.kill()
        control.unlink()


def exit_now() -> None:
    os._exit(0)


def test_pid_alive_sees_exit_and_zombies():
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    child = SPAWN.Process(target=exit_now)
    child.start()
    deadline = time.monotonic() + 10
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(child.pid)  # exited but not joined yet: a zombie
    child.join()
    assert not pid_alive(child.pid)


def write_configs(name: str, count: int) -> None:
    control = ControlBlock.attach(name)
    for i in range(1, count + 1):
        # Lengths vary so a torn read would mix lengths and contents.
        control.write_config(json.dumps({"i": i, "pad": "x" * (i % 97) * 40}).encode())


@pytest.mark.timeout(60)
def test_seqlock_config_is_never_torn(control, base_name):
    assert control.read_config() == (0, b"")
    assert control.config_version == 0
    writer = SPAWN.Process(target=write_configs, args=(base_name, 3000))
    writer.start()
    last = reads = 0
    try:
        while True:
            writer_done = not writer.is_alive()
            version, blob = control.read_config()
            if version:
                doc = json.loads(blob)  # a torn blob would not parse or not match
                assert doc["i"] == version and doc["pad"] == "x" * (version % 97) * 40
            assert version >= last
            last, reads = version, reads + 1
            if writer_done:
                break
        assert last == 3000 and reads > 10
        assert control.config_version == 3000
    finally:
        writer.join(10)
        assert writer.exitcode == 0


def test_config_capacity_is_enforced(base_name):
    control = ControlBlock.create(base_name, 1, config_capacity=100)
    try:
        assert control.write_config(b"y" * 100) == 1
        with pytest.raises(ValueError, match="exceeds the capacity"):
            control.write_config(b"y" * 101)
        assert control.read_config() == (1, b"y" * 100)
    finally:
        control.unlink()


def test_futex_wait_and_wake_on_a_shared_word(control, base_name):
    other = ControlBlock.attach(base_name).segment
    offset = 40  # an unused word of the header line
    start = time.monotonic()
    assert control.segment.futex_wait(offset, 0, 0.1) is False  # word is 0: sleeps until the timeout
    assert time.monotonic() - start >= 0.09
    assert control.segment.futex_wait(offset, 7, 5) is True  # word is not 7: returns at once

    woke = []
    waiter = threading.Thread(target=lambda: woke.append(control.segment.futex_wait(offset, 0, 10)))
    waiter.start()
    time.sleep(0.1)
    other.store_u64(offset, 1)
    other.futex_wake(offset)
    waiter.join(5)
    assert woke == [True] and time.monotonic() - start < 5


def sleep_on_doorbell(name: str) -> None:
    ControlBlock.attach(name).doorbell.wait_any([], 60)


def test_engine_start_forgets_a_dead_engines_sleep(control, base_name):
    dead_engine = SPAWN.Process(target=sleep_on_doorbell, args=(base_name,))
    dead_engine.start()
    deadline = time.monotonic() + 20
    while control.doorbell.waiters == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    dead_engine.kill()  # SIGKILL mid-wait: its sleeper count stays behind
    dead_engine.join()
    assert control.doorbell.waiters == 1
    control.engine_started()
    assert control.doorbell.waiters == 0
