"""How an HTTP worker talks to the engine: `EngineClient` (over the shared-
memory rings, one per worker process) and `InProcessEngineClient` (the same
interface over an EngineCore in a background thread, for tests and embedding).

    client = EngineClient.attach_from_env()
    await client.start()
    stream = await client.submit(request_id, prompt_ids, params)  # EngineRejected / EngineUnavailable
    async for event in stream:   # TokensEvent | FinishedEvent | ErrorEvent (the last one ends it)
        ...
    await client.cancel(request_id)  # any worker's request -> found?
    client.state()                   # EngineSnapshot: state, heartbeat age, load, memory, generation
    await client.close()

`submit` returns once the engine has admitted the request (it acknowledges
with an empty TOKENS), so a refusal surfaces as EngineRejected before the
caller has sent anything to its own client. Two failure kinds stay apart:
a request that failed ends with ErrorEvent(engine_failed=False); when the
engine dies (heartbeat older than ENGINE_DEAD_AFTER_S, state FAILED, or a
new engine generation) every open stream ends with ErrorEvent(engine_failed=
True) within a second. Leaving a stream early (`aclose`, or breaking out of
`async for` inside `contextlib.aclosing`) cancels the request.

Torch-free: the HTTP workers import this module.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence

from dfastllm.config import ServerConfig
from dfastllm.engine.router import RequestRouter
from dfastllm.ipc import EngineState, IpcLayout
from dfastllm.ipc.control import EngineSnapshot, NoFreeSlot
from dfastllm.ipc.messages import (Cancel, CancelAck, DecodeError, Error, Finished, Rejected, RejectReason, Submit,
                                   Tokens, decode, encode)
from dfastllm.ipc.ring import AsyncRingReader, AsyncRingWriter
from dfastllm.sampling_params import SamplingParams

logger = logging.getLogger("dfastllm.engine.client")

ENGINE_DEAD_AFTER_S = 0.75  # heartbeat age at which the engine counts as dead (it beats every 0.1 s)
WATCH_INTERVAL_S = 0.1  # how often open requests check the engine is alive
SUBMIT_RING_TIMEOUT_S = 1.0  # a request ring full this long: EngineUnavailable
CANCEL_TIMEOUT_S = 5.0  # wait for CANCEL_ACK


@dataclasses.dataclass(frozen=True, slots=True)
class TokensEvent:
    ids: list[int]  # newly committed tokens, in order


@dataclasses.dataclass(frozen=True, slots=True)
class FinishedEvent:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    steps: int
    queue_time: float = 0.0  # seconds waiting for the engine
    run_time: float = 0.0  # seconds from the first step to the end


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorEvent:
    message: str
    engine_failed: bool = False  # True: the engine died (503); False: this request failed


Event = TokensEvent | FinishedEvent | ErrorEvent


class EngineUnavailable(RuntimeError):
    """The engine is not ready (loading, restarting, draining, dead) or not reachable."""


class EngineRejected(Exception):
    """The engine refused the request before admitting it."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.name}: {message}")
        self.reason = reason
        self.message = message


class RequestStream:
    """The events of one admitted request; ends after FinishedEvent or ErrorEvent."""

    def __init__(self, client: _ClientBase, request_id: str, generation: int) -> None:
        self.request_id = request_id
        self.generation = generation  # the engine that admitted it
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = False  # the final event is queued (or the caller left)
        self._client = client
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._ended = False  # the caller has read the final event

    def push(self, event: Event) -> None:
        if not self.admitted.done():
            self.admitted.set_result(None)
        self._events.put_nowait(event)
        self.finished = self.finished or not isinstance(event, TokensEvent)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        event = await self._events.get()
        self._ended = not isinstance(event, TokensEvent)
        return event

    async def aclose(self, *, withdraw: bool = False) -> None:
        """Stop listening; cancels the request if it has not finished. With
        `withdraw` (its request was refused as a whole) the engine also frees
        its id, finished or not."""
        self._ended = True
        if not self.finished or withdraw:
            self.finished = True
            self._client._abandon(self, withdraw=withdraw)


class _ClientBase:
    """What both clients share: open streams, the answer routing, submit and cancel.
    A subclass provides the transport: `_send(frame)`, `_check_ready()`, `state()`."""

    def __init__(self) -> None:
        self._streams: dict[str, RequestStream] = {}
        self._acks: dict[int, asyncio.Future[bool]] = {}
        self._reply_tags = itertools.count(1)
        self._background: set[asyncio.Task] = set()
        self.slot = 0

    def table_sizes(self) -> dict[str, int]:
        """Entries of the tables requests fill (open streams, pending cancel
        acknowledgements, background cancels): all empty again once requests end."""
        return {"client_streams": len(self._streams), "client_cancel_acks": len(self._acks),
                "client_background_tasks": len(self._background)}

    async def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                     trace_context: str | None = None) -> RequestStream:
        generation = self._check_ready()
        if request_id in self._streams:
            raise EngineRejected(RejectReason.DUPLICATE_ID, f"request id {request_id!r} is in flight")
        try:
            frame = encode(Submit(request_id, self.slot, prompt_ids, params, trace_context or ""))
        except ValueError as error:
            raise EngineRejected(RejectReason.INVALID, str(error)) from None
        stream = RequestStream(self, request_id, generation)
        self._streams[request_id] = stream
        sent = False
        try:
            await self._send(frame)
            sent = True
            await stream.admitted
        except BaseException:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
                if sent:  # the caller gave up while the engine may have admitted it
                    self._cancel_in_background(request_id)
            raise
        return stream

    async def cancel(self, request_id: str, *, all_choices: bool = False, withdraw: bool = False) -> bool:
        """Cancel any worker's request (with `all_choices`, also its other
        choices, see `choice_id`; with `withdraw`, also free its id); False
        if nothing of it was still running."""
        self._check_ready(allow_draining=True)
        tag = next(self._reply_tags)
        ack = asyncio.get_running_loop().create_future()
        self._acks[tag] = ack
        try:
            await self._send(encode(Cancel(request_id, tag, all_choices, withdraw)))
            return await asyncio.wait_for(ack, CANCEL_TIMEOUT_S)
        except TimeoutError:
            raise EngineUnavailable(f"the engine did not answer a cancel within {CANCEL_TIMEOUT_S} s") from None
        finally:
            self._acks.pop(tag, None)

    # ---- answers from the engine (run on the event loop) ------------------------
    def _on_batch(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                msg = decode(frame)
            except DecodeError as error:
                logger.error("undecodable frame from the engine: %s", error)
                stream = self._streams.pop(error.request_id, None) if error.request_id else None
                if stream is not None:
                    stream.push(ErrorEvent(f"undecodable answer from the engine: {error}"))
                continue
            if isinstance(msg, CancelAck):
                ack = self._acks.get(msg.reply_tag)
                if ack is not None and not ack.done():
                    ack.set_result(msg.found)
                continue
            stream = self._streams.get(msg.request_id)
            if stream is None:
                continue  # a request this worker already gave up on
            if isinstance(msg, Tokens):
                if msg.token_ids:
                    stream.push(TokensEvent(list(msg.token_ids)))
                elif not stream.admitted.done():
                    stream.admitted.set_result(None)  # the admission acknowledgement
                continue
            del self._streams[msg.request_id]
            if isinstance(msg, Finished):
                stream.push(FinishedEvent(msg.reason.api_name, msg.prompt_tokens, msg.completion_tokens, msg.steps,
                                          msg.queue_time, msg.run_time))
            elif isinstance(msg, Error):
                stream.push(ErrorEvent(msg.message))
            elif isinstance(msg, Rejected):
                if not stream.admitted.done():
                    stream.admitted.set_exception(EngineRejected(msg.reason, msg.message))
                else:
                    stream.push(ErrorEvent(f"rejected after admission: {msg.message}"))

    def _fail_open(self, message: str, *, generation: int | None = None) -> None:
        """The engine died: end every open stream (of `generation`, or all)."""
        failed = [s for s in self._streams.values() if generation is None or s.generation == generation]
        for stream in failed:
            del self._streams[stream.request_id]
            if stream.admitted.done():
                stream.push(ErrorEvent(message, engine_failed=True))
            else:
                stream.admitted.set_exception(EngineUnavailable(message))
        if generation is None:
            for ack in self._acks.values():
                if not ack.done():
                    ack.set_exception(EngineUnavailable(message))
        if failed:
            logger.warning("ended %d open request(s): %s", len(failed), message)

    def _abandon(self, stream: RequestStream, *, withdraw: bool = False) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            self._cancel_in_background(stream.request_id, withdraw=withdraw)
        elif withdraw:  # finished already: only the id is left to free
            self._cancel_in_background(stream.request_id, withdraw=True)

    def _cancel_in_background(self, request_id: str, *, withdraw: bool = False) -> None:
        async def cancel() -> None:
            try:
                await self.cancel(request_id, withdraw=withdraw)
            except EngineUnavailable:
                pass  # a dead engine runs nothing
        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- the transport ----------------------------------------------------------
    async def _send(self, frame: bytes) -> None:
        raise NotImplementedError

    def _check_ready(self, *, allow_draining: bool = False) -> int:
        """The engine generation if it can take requests, else EngineUnavailable."""
        snap = self.state()
        accepted = (EngineState.READY, EngineState.DRAINING) if allow_draining else (EngineState.READY,)
        if snap.state not in accepted:
            raise EngineUnavailable(f"the engine is {snap.state.name.lower()}")
        if snap.heartbeat_age > ENGINE_DEAD_AFTER_S:
            raise EngineUnavailable(f"the engine has not sent a heartbeat for {snap.heartbeat_age:.1f} s")
        return snap.generation

    def state(self) -> EngineSnapshot:
        raise NotImplementedError


class EngineClient(_ClientBase):
    """One HTTP worker's connection to the engine process (see the module doc)."""

    def __init__(self, layout: IpcLayout) -> None:
        super().__init__()
        self.layout = layout
        self.control = layout.control
        self._endpoint = None
        self._reader: AsyncRingReader | None = None
        self._writer: AsyncRingWriter | None = None
        self._watchdog: asyncio.Task | None = None
        self._something_open = asyncio.Event()

    @classmethod
    def attach_from_env(cls) -> EngineClient:
        """Attach to the segments named by $DFASTLLM_IPC_NAME (set by `dfastllm serve`)."""
        return cls(IpcLayout.attach())

    async def start(self) -> None:
        """Claim a worker slot (the engine sees this process from now on) and
        start listening on its response ring."""
        try:
            endpoint = self.layout.claim_worker_slot()
        except NoFreeSlot as error:
            raise EngineUnavailable(str(error)) from None
        self._endpoint = endpoint
        self.slot = endpoint.slot
        self._writer = AsyncRingWriter(endpoint.requests)
        self._reader = AsyncRingReader(endpoint.responses, self._on_batch)
        self._reader.start()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_engine())

    async def close(self) -> None:
        """Release the slot; the engine cancels whatever is still open."""
        if self._endpoint is None:
            return
        self._watchdog.cancel()
        self._fail_open("the worker is shutting down")
        # The reader must be asleep no more when the slot goes back: the
        # engine then resets the rings, sleeper counts included.
        await asyncio.to_thread(self._reader.stop)
        self._endpoint.release()
        self._endpoint = None

    def state(self) -> EngineSnapshot:
        return self.control.snapshot()

    async def _send(self, frame: bytes) -> None:
        if self._writer is None:
            raise EngineUnavailable("the engine client is not started")
        self._something_open.set()
        try:
            await self._writer.put(frame, timeout=SUBMIT_RING_TIMEOUT_S)
        except TimeoutError:
            raise EngineUnavailable(f"the engine has not read its request ring for {SUBMIT_RING_TIMEOUT_S} s") \
                from None

    async def _watch_engine(self) -> None:
        """While requests are open, check the engine is alive every
        WATCH_INTERVAL_S; sleeps without waking while nothing is open."""
        while True:
            if not self._streams and not self._acks:
                self._something_open.clear()
                await self._something_open.wait()
            await asyncio.sleep(WATCH_INTERVAL_S)
            snap = self.control.snapshot()
            if snap.state in (EngineState.FAILED, EngineState.STOPPED, EngineState.LOADING, EngineState.WARMING):
                self._fail_open(f"the engine is {snap.state.name.lower()}")
            elif snap.heartbeat_age > ENGINE_DEAD_AFTER_S:
                self._fail_open(f"the engine stopped responding (no heartbeat for {snap.heartbeat_age:.2f} s)")
            else:
                for generation in {s.generation for s in self._streams.values()} - {snap.generation}:
                    self._fail_open("the engine restarted", generation=generation)


class InProcessEngineClient(_ClientBase):
    """The EngineClient interface over an EngineCore run by a thread of this
    process: the same admission, codec and answers as the engine process,
    without rings. For tests and for embedding the engine in an application.

    `engine` is an EngineCore, or a LoadedModel to build one from `config`.
    Its metrics live in `metrics_registry` (this process only)."""

    def __init__(self, engine, config: ServerConfig | None = None) -> None:
        super().__init__()
        from dfastllm.engine.metrics import EngineMetrics

        config = config or ServerConfig()
        metrics = EngineMetrics()
        self.metrics_registry = metrics.registry
        if not hasattr(engine, "step"):  # a LoadedModel
            from dfastllm.engine.core import EngineCore

            engine = EngineCore(engine, kv_cache=config.kv_cache, max_batch_size=config.max_batch_size,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                kv_cache_memory=config.kv_cache_memory, max_model_len=config.max_model_len,
                                cuda_graphs=config.cuda_graphs)
        self.core = engine
        self.router = RequestRouter(engine, config, metrics=metrics)
        self._inbox: collections.deque[bytes] = collections.deque()
        self._wake = threading.Condition()
        self._state = EngineState.STOPPED
        self._heartbeat = time.monotonic()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._state = EngineState.READY
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="in-process-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is None:
            return
        with self._wake:
            self._state = EngineState.STOPPED
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._fail_open("the engine client was closed")

    def state(self) -> EngineSnapshot:
        from dfastllm.engine.process import device_memory

        used, total = device_memory(self.core.device)
        return EngineSnapshot(self._state, 1, os.getpid(), time.monotonic() - self._heartbeat,
                              self.core.num_waiting, self.core.num_running, used, total)

    async def _send(self, frame: bytes) -> None:
        with self._wake:
            self._inbox.append(frame)
            self._wake.notify()

    def _run(self) -> None:
        """The engine thread: the engine process's loop without rings."""
        try:
            while True:
                with self._wake:
                    while not self._inbox and not self.core.has_unfinished() and self._state == EngineState.READY:
                        self._heartbeat = time.monotonic()
                        self._wake.wait(0.25)
                    if self._state != EngineState.READY:
                        return
                    frames = list(self._inbox)
                    self._inbox.clear()
                replies = []
                for frame in frames:
                    msg = decode(frame)
                    handle = self.router.submit if isinstance(msg, Submit) else self.router.cancel
                    replies += handle(self.slot, msg)
                if self.core.has_unfinished():
                    replies += self.router.step()
                self._heartbeat = time.monotonic()
                if replies and not self._post(self._on_batch, [encode(msg) for _, msg in replies]):
                    return
        except BaseException as error:  # noqa: BLE001 - the engine thread dying is the "engine dead" case
            logger.exception("the in-process engine failed")
            self._state = EngineState.FAILED
            self._post(self._fail_open, f"the engine failed: {type(error).__name__}: {error}")

    def _post(self, callback, *args) -> bool:
        """Run `callback(*args)` on the client's loop; False if that loop is
        closed (its application ended without close()): nobody is left to answer."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:
            self._state = EngineState.STOPPED
            return False
