import hashlib
import multiprocessing
import os
import random
import signal
import struct
import threading
import time

import pytest

from dfastllm._ipc import Segment
from dfastllm.ipc.ring import Ring

SPAWN = multiprocessing.get_context("spawn")


def frame(seq: int, rng: random.Random, max_len: int) -> bytes:
    """A message that proves its own integrity: seq, payload, digest."""
    payload = rng.randbytes(rng.randint(0, max_len))
    return struct.pack("<I", seq) + payload + hashlib.blake2b(payload, digest_size=8).digest()


def frame_bytes(n: int) -> int:
    """Ring space a message of n bytes takes: 8-byte header, 8-byte padding."""
    return 8 + (n + 7) // 8 * 8


def check_frame(data: bytes, seq: int) -> None:
    assert struct.unpack_from("<I", data)[0] == seq
    payload, digest = data[4:-8], data[-8:]
    assert hashlib.blake2b(payload, digest_size=8).digest() == digest


@pytest.fixture
def ring(base_name):
    ring = Ring.create(base_name, 4096)
    yield ring
    Ring.unlink(ring.name)


def test_round_trip_bytes_like_and_empty(ring):
    for data in (b"hello", bytearray(b"\x01\x02\x03"), memoryview(b"abcdefgh")[2:6], b""):
        assert ring.try_put(data)
        assert ring.get_nowait() == bytes(data)
    assert ring.get_nowait() is None
    assert ring.used_bytes == 0


def test_largest_message_fits_one_more_does_not(ring):
    biggest = os.urandom(ring.max_message_size)
    assert ring.max_message_size == ring.capacity - 8
    ring.put(biggest, timeout=0)
    assert ring.get_nowait() == biggest
    with pytest.raises(ValueError, match="exceeds the ring's limit"):
        ring.try_put(b"x" * (ring.max_message_size + 1))


def test_wrap_around_random_sizes_keeps_content_and_order(ring):
    rng = random.Random(7)
    sent = got = 0
    pending = []
    # Many passes over the 4 KiB ring: frames start at every 8-aligned
    # offset and payloads split at the end of the data area.
    while got < 3000:
        for _ in range(rng.randint(1, 6)):
            msg = frame(sent, rng, 900)
            if not ring.try_put(msg):
                break
            pending.append(msg)
            sent += 1
        for msg in ring.get_many(rng.randint(1, 5)):
            assert msg == pending.pop(0)
            check_frame(msg, got)
            got += 1
    assert ring.used_bytes == sum(frame_bytes(len(m)) for m in pending)


def test_full_ring_is_backpressure_not_loss(ring):
    rng = random.Random(3)
    accepted = []
    while ring.try_put(msg := frame(len(accepted), rng, 200)):
        accepted.append(msg)
    while ring.try_put(b""):  # 8-byte frames fill it to the brim
        accepted.append(b"")
    assert ring.used_bytes == ring.capacity
    assert not ring.try_put(b"")  # full: refused, nothing overwritten
    first = ring.get_nowait()
    assert first == accepted[0]
    assert ring.try_put_many([b"a", b"b"]) >= 1  # space came back
    rest = ring.get_many(10_000)
    assert rest[: len(accepted) - 1] == accepted[1:]


def test_try_put_many_writes_a_prefix_in_order(ring):
    messages = [os.urandom(1000) for _ in range(6)]
    written = ring.try_put_many(messages)
    assert written == 4  # 4 * 1008 bytes fit in 4096, the 5th does not
    assert ring.get_many() == messages[:4]
    assert ring.try_put_many(messages[4:]) == 2


def test_put_timeout_and_put_waiting_for_space(ring):
    filler = os.urandom(1000)
    while ring.try_put(filler):
        pass
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        ring.put(filler, timeout=0.1)
    assert 0.09 < time.monotonic() - start < 2.0

    def drain_later():
        time.sleep(0.1)
        ring.get_nowait()

    t = threading.Thread(target=drain_later)
    t.start()
    ring.put(b"late", timeout=5)  # sleeps on the space doorbell until the get
    t.join()
    assert ring.producer_waiters == 0
    assert ring.get_many()[-1] == b"late"


def test_get_timeout_and_wake_on_put(ring):
    start = time.monotonic()
    assert ring.get(timeout=0.1) is None
    assert 0.09 < time.monotonic() - start < 2.0

    threading.Timer(0.05, ring.try_put, args=(b"ping",)).start()
    start = time.monotonic()
    assert ring.get(timeout=10) == b"ping"
    assert time.monotonic() - start < 1.0
    assert ring.consumer_waiters == 0


def test_wait_readable_returns_on_wake_consumer(ring):
    threading.Timer(0.05, ring.wake_consumer).start()
    start = time.monotonic()
    assert ring.wait_readable(10) is False
    assert time.monotonic() - start < 1.0


def test_waiting_costs_no_cpu(ring):
    cpu = time.process_time()
    assert ring.get(timeout=1.0) is None
    assert time.process_time() - cpu < 0.01  # < 1% of a core over the wait


def test_signal_interrupts_a_wait(ring):
    class Alarm(Exception):
        pass

    def on_alarm(signum, frame):
        raise Alarm

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        start = time.monotonic()
        with pytest.raises(Alarm):
            ring.get(timeout=10)
        assert time.monotonic() - start < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_reset_drops_unread_messages(ring):
    ring.put(b"stale")
    ring.reset()
    assert ring.get_nowait() is None
    ring.put(b"fresh")
    assert ring.get_nowait() == b"fresh"


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_reset_under_a_live_sleeper_keeps_it_wakeable(ring):
    got = []
    consumer = threading.Thread(target=lambda: got.append(ring.get(timeout=20)))
    consumer.start()
    wait_for(lambda: ring.consumer_waiters == 1)
    ring.reset()  # zeroes the count under the sleeper, which wakes and counts itself again
    wait_for(lambda: ring.consumer_waiters == 1)
    start = time.monotonic()
    ring.put(b"after reset")
    consumer.join(10)
    assert got == [b"after reset"] and time.monotonic() - start < 5


def test_objects_attached_earlier_do_not_trust_old_indexes(ring):
    # A restarted engine or the supervisor may use a Ring object whose
    # cached indexes are far behind what other objects did meanwhile.
    old_producer, old_consumer = Ring.attach(ring.name), Ring.attach(ring.name)
    for i in range(40):  # several laps through the ring via `ring`
        ring.put(os.urandom(900))
        ring.get_nowait()
    ring.put(b"unread")
    assert old_consumer.get_nowait() == b"unread"
    assert old_consumer.get_nowait() is None
    while old_producer.try_put(b"p" * 500):
        pass
    assert ring.used_bytes <= ring.capacity
    assert ring.get_many() == [b"p" * 500] * (ring.capacity // frame_bytes(500))  # nothing overwritten


def test_names_errors_and_unlink(base_name):
    with pytest.raises(ValueError, match="power of two"):
        Ring.create(base_name, 5000)
    ring = Ring.create(base_name, 8192)
    with pytest.raises(FileExistsError, match="already exists"):
        Ring.create(base_name, 8192)
    assert Ring.attach(base_name).capacity == 8192
    assert Ring.unlink(base_name) is True
    assert not os.path.exists(f"/dev/shm/{base_name}")
    assert Ring.unlink(base_name) is False
    with pytest.raises(FileNotFoundError, match="no shared-memory segment named"):
        Ring.attach(base_name)
    ring.put(b"still mapped")  # the unlinked mapping stays usable
    assert ring.get_nowait() == b"still mapped"

    Segment.create(base_name, 8192)  # a segment that is not a ring
    try:
        with pytest.raises(ValueError, match="not a dfastllm ring"):
            Ring.attach(base_name)
    finally:
        Segment.unlink(base_name)
    with pytest.raises(ValueError, match="without '/'"):
        Ring.attach("a/b")


# ------------------------------------------------------------ across processes

def produce(name: str, count: int, seed: int) -> None:
    ring = Ring.attach(name)
    rng = random.Random(seed)
    for seq in range(count):
        ring.put(frame(seq, rng, 3000), timeout=20)


def echo(request_name: str, response_name: str) -> None:
    requests, responses = Ring.attach(request_name), Ring.attach(response_name)
    while (msg := requests.get(timeout=20)) != b"stop":
        responses.put(msg[::-1], timeout=20)


@pytest.mark.timeout(60)
def test_across_processes_with_backpressure(base_name):
    ring = Ring.create(base_name, 8192)  # small: the producer must wait often
    child = SPAWN.Process(target=produce, args=(base_name, 3000, 11))
    child.start()
    try:
        for seq in range(3000):
            msg = ring.get(timeout=20)
            assert msg is not None, f"producer stalled at {seq}"
            check_frame(msg, seq)
        child.join(20)
        assert child.exitcode == 0
        assert ring.get_nowait() is None
    finally:
        child.kill()
        Ring.unlink(base_name)


@pytest.mark.timeout(60)
def test_ping_pong_across_processes(base_name):
    requests = Ring.create(base_name + "-req", 1 << 16)
    responses = Ring.create(base_name + "-rsp", 1 << 16)
    child = SPAWN.Process(target=echo, args=(requests.name, responses.name))
    child.start()
    try:
        rng = random.Random(5)
        for _ in range(500):
            msg = rng.randbytes(rng.randint(1, 5000))
            requests.put(msg, timeout=10)
            assert responses.get(timeout=10) == msg[::-1]
        requests.put(b"stop")
        child.join(10)
        assert child.exitcode == 0
    finally:
        child.kill()
        Ring.unlink(requests.name)
        Ring.unlink(responses.name)
