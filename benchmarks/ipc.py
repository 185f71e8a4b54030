"""Worker <-> engine transport: dfastllm's shared-memory rings against
multiprocessing.Queue and pyzmq (PAIR over ipc://), in one run.

    python benchmarks/ipc.py                 # table
    python benchmarks/ipc.py --quick --json  # fewer round trips; JSON object printed last

For each transport and message size (32 B, 4 KiB):
- round trip: a ping-pong between two processes (the echo side blocks in
  its receive, as the engine and a worker do when idle), p50 and p99;
- throughput: one process streams messages as fast as the transport takes
  them, the other receives them all (messages per second, blocking waits on
  both sides, so backpressure is part of it).
Also the ring round trip with side a on an asyncio loop (AsyncRingReader),
the HTTP worker's path. Then the idle cost of a waiting consumer: process CPU time over a few
seconds of waiting for a message that does not come, for a blocking
`Ring.get` and for an asyncio loop with an `AsyncRingReader`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import time

import zmq

from dfastllm.ipc.ring import AsyncRingReader, Ring

SIZES = (32, 4096)
RING_CAPACITY = 1 << 20
STOP = b"stop"


# ------------------------------------------------------------------ transports
# Each transport is a pair of endpoints (a, b); `send`/`recv` block.

class RingPair:
    def __init__(self, tag: str):
        # Only names travel to the child; the segments outlive this mapping.
        self.names = (f"dfastllm-bench-{os.getpid()}-{tag}-ab", f"dfastllm-bench-{os.getpid()}-{tag}-ba")
        for name in self.names:
            Ring.create(name, RING_CAPACITY)

    def endpoint(self, side: str):
        return RingEnd(self.names, side)

    def close(self):
        for name in self.names:
            Ring.unlink(name)


class RingEnd:
    def __init__(self, names, side):
        ab, ba = (Ring.attach(n) for n in names)
        self.out, self.inp = (ab, ba) if side == "a" else (ba, ab)

    def send(self, data: bytes):
        self.out.put(data)

    def recv(self) -> bytes:
        return self.inp.get()


class QueuePair:
    def __init__(self, tag: str):
        ctx = multiprocessing.get_context("spawn")
        self.queues = (ctx.Queue(), ctx.Queue())

    def endpoint(self, side: str):
        return QueueEnd(self.queues, side)

    def close(self):
        pass


class QueueEnd:
    def __init__(self, queues, side):
        self.out, self.inp = queues if side == "a" else queues[::-1]

    def send(self, data: bytes):
        self.out.put(data)

    def recv(self) -> bytes:
        return self.inp.get()


class ZmqPair:
    def __init__(self, tag: str):
        self.address = f"ipc:///tmp/dfastllm-bench-{os.getpid()}-{tag}.sock"

    def endpoint(self, side: str):
        return ZmqEnd(self.address, side)

    def close(self):
        path = self.address[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)


class ZmqEnd:
    def __init__(self, address, side):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PAIR)
        (self.socket.bind if side == "a" else self.socket.connect)(address)

    def send(self, data: bytes):
        self.socket.send(data, copy=len(data) < 65536)

    def recv(self) -> bytes:
        return self.socket.recv()


TRANSPORTS = {"shm ring": RingPair, "mp.Queue": QueuePair, "zmq PAIR ipc": ZmqPair}


# ------------------------------------------------------------------ the two sides

def echo_side(pair, ready):
    end = pair.endpoint("b")
    ready.set()
    while (msg := end.recv()) != STOP:
        end.send(msg)


def sink_side(pair, ready, count):
    end = pair.endpoint("b")
    ready.set()
    for _ in range(count):
        end.recv()
    end.send(b"done")


def run_pair(transport, size: int, round_trips: int, stream: int) -> dict:
    msg = os.urandom(size)

    def ping_pong(end):
        for _ in range(min(1000, round_trips)):  # warm-up
            end.send(msg)
            end.recv()
        lat = []
        for _ in range(round_trips):
            t0 = time.perf_counter_ns()
            end.send(msg)
            end.recv()
            lat.append(time.perf_counter_ns() - t0)
        end.send(STOP)
        return sorted(lat)

    def throughput(end):
        t0 = time.perf_counter()
        for _ in range(stream):
            end.send(msg)
        assert end.recv() == b"done"
        return stream / (time.perf_counter() - t0)

    # A fresh pair per phase: a zmq PAIR socket does not take a second peer.
    lat = with_peer(transport, f"rt{size}", echo_side, (), ping_pong)
    rate = with_peer(transport, f"tp{size}", sink_side, (stream,), throughput)
    return {"p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3,
            "mean_us": statistics.fmean(lat) / 1e3, "msgs_per_s": rate}


def with_peer(transport, tag, peer_target, peer_args, measure):
    """Run `peer_target` on side b in a spawned process and `measure` on side a."""
    ctx = multiprocessing.get_context("spawn")
    pair = transport(tag)
    try:
        ready = ctx.Event()
        child = ctx.Process(target=peer_target, args=(pair, ready, *peer_args))
        child.start()
        end = pair.endpoint("a")
        if not ready.wait(60):
            raise RuntimeError(f"{transport.__name__} peer did not start")
        result = measure(end)
        child.join(30)
        return result
    finally:
        pair.close()


def run_asyncio_ring(size: int, round_trips: int) -> dict:
    """Ping-pong whose side a is an asyncio loop, as in an HTTP worker: it
    puts with try_put and gets the echo through an AsyncRingReader (waiter
    thread -> call_soon_threadsafe)."""
    msg = os.urandom(size)

    def measure(end):
        async def main():
            arrived = asyncio.Queue()
            reader = AsyncRingReader(end.inp, lambda batch: [arrived.put_nowait(m) for m in batch])
            reader.start()
            lat = []
            for i in range(min(1000, round_trips) + round_trips):
                t0 = time.perf_counter_ns()
                end.out.put(msg)
                await arrived.get()
                lat.append(time.perf_counter_ns() - t0)
            end.out.put(STOP)
            reader.stop()
            return sorted(lat[min(1000, round_trips):])

        return asyncio.run(main())

    lat = with_peer(RingPair, f"aio{size}", echo_side, (), measure)
    return {"p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3,
            "mean_us": statistics.fmean(lat) / 1e3}


# ------------------------------------------------------------------ idle cost

def idle_blocking(name, seconds, result):
    ring = Ring.attach(name)
    cpu, wall = time.process_time(), time.monotonic()
    ring.get(timeout=seconds)
    result.put((time.process_time() - cpu) / (time.monotonic() - wall))


def idle_asyncio(name, seconds, result):
    async def main():
        reader = AsyncRingReader(Ring.attach(name), lambda batch: None)
        reader.start()
        await asyncio.sleep(0.1)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        share = (time.process_time() - cpu) / (time.monotonic() - wall)
        reader.stop()
        return share

    result.put(asyncio.run(main()))


def idle_cpu(seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    name = f"dfastllm-bench-{os.getpid()}-idle"
    Ring.create(name, 4096)
    out = {}
    try:
        for label, target in (("blocking Ring.get", idle_blocking), ("asyncio AsyncRingReader", idle_asyncio)):
            result = ctx.Queue()
            child = ctx.Process(target=target, args=(name, seconds, result))
            child.start()
            out[label] = 100 * result.get(timeout=seconds + 30)
            child.join(10)
    finally:
        Ring.unlink(name)
    return out


# ------------------------------------------------------------------ main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--stream", type=int, default=100000, help="messages per throughput run")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="2000 round trips, 20000 streamed, 1 s idle")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    if args.quick:
        args.round_trips, args.stream, args.idle_seconds = 2000, 20000, 1.0

    results = {}
    for size in SIZES:
        for name, transport in TRANSPORTS.items():
            results[f"{name} {size}B"] = run_pair(transport, size, args.round_trips, args.stream)
    asyncio_side = {f"shm ring, asyncio side {size}B": run_asyncio_ring(size, args.round_trips) for size in SIZES}
    idle = idle_cpu(args.idle_seconds)

    print(f"IPC ping-pong between two processes ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()},"
          f" load {os.getloadavg()[0]:.1f}), {args.round_trips} round trips, {args.stream} streamed")
    print(f"{'transport':<28}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}{'msgs/s':>12}")
    for key, r in results.items():
        print(f"{key:<28}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}{r['mean_us']:>10.1f}{r['msgs_per_s']:>12,.0f}")
    for key, r in asyncio_side.items():
        print(f"{key:<28}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}{r['mean_us']:>10.1f}{'':>12}")
    for size in SIZES:
        ratio = results[f"shm ring {size}B"]["p50_us"] / results[f"zmq PAIR ipc {size}B"]["p50_us"]
        print(f"ring p50 / zmq p50 at {size} B: {ratio:.2f} (target <= 0.33)")
    for label, pct in idle.items():
        print(f"idle consumer CPU, {label}: {pct:.3f}% of a core over {args.idle_seconds:g} s (target < 1%)")
    if args.json:
        print(json.dumps({"round_trip": results, "round_trip_asyncio": asyncio_side, "idle_cpu_percent": idle, "cpus": os.cpu_count(),
                          "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
