"""Shared-memory rings and the helpers each side drives them with.

`Ring` is the C++ single-producer single-consumer ring (`dfastllm._ipc`):
    Ring.create(name, capacity) / Ring.attach(name) / Ring.unlink(name)
    try_put(data) -> bool          full ring = False (backpressure, nothing lost)
    try_put_many(list) -> int      in order, until one does not fit
    put(data, timeout=None)        waits for space; TimeoutError
    get_nowait() -> bytes | None ; get(timeout=None) -> bytes | None
    get_many(max_messages=1024) -> list[bytes]
    wait_readable(timeout=None) -> bool ; wait_writable(nbytes, timeout=None) -> bool
    wake_consumer() ; reset() ; set_doorbell(doorbell | None)
Waits sleep on a futex with the GIL released; one thread may produce and
one consume per ring.

The helpers below give each side what it needs without polling:
- `AsyncRingReader` (HTTP worker, response ring): one waiter thread per ring
  sleeps in the futex and hands batches to the event loop.
- `AsyncRingWriter` (HTTP worker, request ring): `await put()` that waits for
  space off the loop and keeps messages in order.
- `RingSender` (engine, response rings): never blocks the engine loop; what
  does not fit waits in a FIFO backlog flushed on the next step.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Callable

from dfastllm._ipc import Ring

__all__ = ["AsyncRingReader", "AsyncRingWriter", "Ring", "RingSender"]


class AsyncRingReader:
    """Delivers a ring's messages to an asyncio loop as batches.

    `on_batch(list[bytes])` runs on the loop. At most one batch is in flight:
    while the loop has not run the previous one, messages stay in the ring
    (and are picked up together next time), so a slow loop pushes back on
    the engine instead of buffering without bound."""

    def __init__(self, ring: Ring, on_batch: Callable[[list[bytes]], None], *,
                 loop: asyncio.AbstractEventLoop | None = None, max_batch: int = 1024):
        self._ring = ring
        self._on_batch = on_batch
        self._loop = loop
        self._max_batch = max_batch
        self._in_flight = threading.Semaphore(1)
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the waiter thread (call from the loop, or pass loop=)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"ring-reader{self._ring.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the thread; messages still in the ring stay there."""
        self._stopping = True
        self._in_flight.release()
        deadline = time.monotonic() + timeout
        # Wake repeatedly: a wake that lands before the thread arms its wait
        # is not seen by it, and the stop flag is not part of the futex word.
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            self._ring.wake_consumer()
            self._thread.join(0.02)
        self._thread = None

    def _run(self) -> None:
        while True:
            self._in_flight.acquire()
            while not self._stopping and not self._ring.wait_readable(None):
                pass  # a bare wake: look at the stop flag, then sleep again
            if self._stopping:
                return
            batch = self._ring.get_many(self._max_batch)
            if not batch:  # woken by a stop that then did not happen; nothing lost
                self._in_flight.release()
                continue
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop is closed: the worker is shutting down
                return

    def _deliver(self, batch: list[bytes]) -> None:
        try:
            self._on_batch(batch)
        finally:
            self._in_flight.release()


class AsyncRingWriter:
    """`await put(data)` for a producer on an event loop. A full ring is
    waited out in a helper thread (futex, no polling) while later puts queue
    behind in FIFO order, so a CANCEL can never overtake its SUBMIT."""

    def __init__(self, ring: Ring):
        self._ring = ring
        self._lock = asyncio.Lock()

    async def put(self, data: bytes, timeout: float | None = None) -> None:
        """TimeoutError if the ring stayed full for `timeout` seconds."""
        if not self._lock.locked() and self._ring.try_put(data):
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._lock:
            while not self._ring.try_put(data):
                # Bounded slices, so a cancelled put never leaves a helper
                # thread sleeping for long.
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"ring {self._ring.name} stayed full for {timeout} s")
                await asyncio.to_thread(self._ring.wait_writable, len(data), wait)


class RingSender:
    """Non-blocking, lossless producer for the engine loop: `send` writes
    now if it can, else queues; `flush` retries the queue in order."""

    FLUSH_CHUNK = 256

    def __init__(self, ring: Ring):
        self.ring = ring
        self._backlog: collections.deque[bytes] = collections.deque()

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def send(self, data: bytes) -> bool:
        """True if written now, False if queued behind earlier messages."""
        if not self._backlog and self.ring.try_put(data):
            return True
        self._backlog.append(data)
        return False

    def send_many(self, messages: list[bytes]) -> None:
        if self._backlog:
            self._backlog.extend(messages)
            return
        written = self.ring.try_put_many(messages)
        self._backlog.extend(messages[written:])

    def flush(self) -> bool:
        """Write as much backlog as fits; True when the backlog is empty."""
        while self._backlog:
            # In chunks: a long backlog behind a full ring costs one small
            # attempt per flush, not a pass over all of it.
            chunk = list(itertools.islice(self._backlog, self.FLUSH_CHUNK))
            written = self.ring.try_put_many(chunk)
            for _ in range(written):
                self._backlog.popleft()
            if written < len(chunk):
                return False
        return True

    def clear(self) -> None:
        """Drop the backlog (the consumer is gone)."""
        self._backlog.clear()
