import asyncio
import multiprocessing
import os
import struct
import threading
import time

import pytest

from dfastllm.ipc.ring import AsyncRingReader, AsyncRingWriter, Ring, RingSender

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def ring(base_name):
    ring = Ring.create(base_name, 4096)
    yield ring
    Ring.unlink(ring.name)


def produce_numbered(name: str, count: int, gap_every: int) -> None:
    ring = Ring.attach(name)
    for i in range(count):
        ring.put(struct.pack("<I", i) + os.urandom(i % 300), timeout=20)
        if i % gap_every == 0:
            time.sleep(0.002)  # let the consumer catch up and go back to sleep


@pytest.mark.timeout(60)
def test_reader_delivers_everything_in_order_across_processes(ring):
    count = 3000

    async def main():
        got = []
        done = asyncio.Event()

        def on_batch(batch):
            got.extend(struct.unpack_from("<I", m)[0] for m in batch)
            if len(got) % 7 == 0:
                time.sleep(0.001)  # a busy loop: messages must wait in the ring, not vanish
            if len(got) >= count:
                done.set()

        reader = AsyncRingReader(ring, on_batch)
        reader.start()
        producer = SPAWN.Process(target=produce_numbered, args=(ring.name, count, 50))
        producer.start()
        try:
            await asyncio.wait_for(done.wait(), 30)
        finally:
            reader.stop()
            producer.join(10)
        assert got == list(range(count))

    asyncio.run(main())


def test_reader_wakes_promptly_and_idles_without_cpu(ring):
    async def main():
        arrived = asyncio.Queue()
        reader = AsyncRingReader(ring, lambda batch: [arrived.put_nowait((m, time.monotonic())) for m in batch])
        reader.start()
        await asyncio.sleep(0.05)  # the waiter thread is asleep in the futex now
        cpu = time.process_time()
        await asyncio.sleep(1.0)
        idle_cpu = time.process_time() - cpu
        latencies = []
        for i in range(20):
            sent = time.monotonic()
            threading.Thread(target=ring.try_put, args=(b"m%d" % i,)).start()
            msg, at = await asyncio.wait_for(arrived.get(), 5)
            assert msg == b"m%d" % i
            latencies.append(at - sent)
        start = time.monotonic()
        reader.stop()
        assert time.monotonic() - start < 1.0
        return idle_cpu, sorted(latencies)[10]

    idle_cpu, median_latency = asyncio.run(main())
    assert idle_cpu < 0.01  # < 1% of a core while waiting
    assert median_latency < 0.05


def test_writer_waits_for_space_in_fifo_order_and_times_out(ring):
    filler = os.urandom(1000)
    while ring.try_put(filler):
        pass
    drained = []

    def drain_later():
        time.sleep(0.2)
        while len(drained) < 10:
            msg = ring.get(timeout=5)
            if msg is not None and msg != filler:
                drained.append(msg)

    async def main():
        writer = AsyncRingWriter(ring)
        with pytest.raises(TimeoutError):
            await writer.put(filler, timeout=0.05)
        consumer = threading.Thread(target=drain_later)
        consumer.start()
        # Ten puts issued at once: all wait, then land in the order issued.
        await asyncio.gather(*(writer.put(b"%d" % i + os.urandom(500), timeout=10) for i in range(10)))
        await asyncio.to_thread(consumer.join)

    asyncio.run(main())
    assert [m[:1] for m in drained] == [b"%d" % i for i in range(10)]


def test_sender_queues_what_does_not_fit_and_flushes_in_order(ring):
    sender = RingSender(ring)
    messages = [struct.pack("<I", i) + os.urandom(700) for i in range(12)]
    assert sender.send(messages[0]) is True
    sender.send_many(messages[1:])
    assert sender.backlog == 12 - 5  # 5 frames of 712 bytes fit in 4096
    received = ring.get_many()
    assert sender.flush() is False  # 5 more fit, 2 still wait
    assert sender.backlog == 2
    received += ring.get_many()
    assert sender.flush() is True
    received += ring.get_many()
    assert received == messages
    assert sender.send(b"x" * 4000) is True
    assert sender.send(b"y" * 200) is False
    assert sender.send(b"after") is False  # behind the backlog even though it would fit
    sender.clear()
    assert sender.backlog == 0


def test_sender_long_backlog_flushes_in_order(ring):
    sender = RingSender(ring)
    messages = [struct.pack("<I", i) for i in range(1000)]  # 16-byte frames: 256 fit at a time
    sender.send_many(messages)
    received = []
    while sender.backlog or len(received) < 1000:
        received += ring.get_many()
        sender.flush()
    assert received == messages
