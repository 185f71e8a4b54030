"""Between the wire and EngineCore: admission, ownership and translation.

The engine process and the in-process client both put a `RequestRouter` in
front of their EngineCore, so the two refuse the same requests, answer the
same way and report the same finish reasons. It does no IO either: each
call returns the replies as `(worker slot, message)` pairs, and the caller
delivers them (rings in the engine process, the event loop in process).

Protocol facts decided here:
- an admitted SUBMIT is acknowledged at once with an empty TOKENS, so a
  worker knows the outcome (admitted, or REJECTED with a reason) before the
  first token, and can answer 409/503 before sending any header;
- a cancelled request gets FINISHED(cancelled) on its owner's ring, because
  EngineCore.abort emits nothing; the canceller gets CANCEL_ACK;
- a request that failed in a step gets ERROR; the engine runs on, unless
  steps keep failing: then the circuit breaker (`circuit.py`) refuses new
  SUBMITs with NOT_READY until a probe request succeeds.

Torch-free: the in-process client imports it from `dfastllm.engine.client`.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from dfastllm import tracing
from dfastllm.config import ServerConfig
from dfastllm.engine.circuit import CircuitBreaker
from dfastllm.ipc.messages import (Cancel, CancelAck, Error, Finished, FinishReason, Message, Rejected, RejectReason,
                                   Submit, Tokens, is_choice_of)

Reply = tuple[int, Message]  # (worker slot, message)

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


class RecentRequestIds:
    """Request ids admitted in the last `window_s` seconds, oldest first.

    Bounded: past `max_ids` entries the oldest are forgotten early, so a
    flood of requests costs memory in proportion to `max_ids`, not to time.
    """

    def __init__(self, window_s: float, max_ids: int = 200_000) -> None:
        self.window_s = window_s
        self.max_ids = max_ids
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if seen_at > horizon and len(self._seen) <= self.max_ids:
                return
            del self._seen[oldest]

    def __contains__(self, request_id: str) -> bool:
        self._expire(time.monotonic())
        return request_id in self._seen

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._seen[request_id] = now
        self._seen.move_to_end(request_id)
        self._expire(now)

    def discard(self, request_id: str) -> None:
        self._seen.pop(request_id, None)


@dataclasses.dataclass
class _Live:
    """What the router remembers of one admitted request."""
    slot: int  # the owning worker
    prompt_tokens: int
    submitted_at: float  # time.monotonic() of the worker's SUBMIT (machine-wide clock)
    trace_context: str
    completion_tokens: int = 0
    steps: int = 0
    started_at: float | None = None  # first denoising step


class RequestRouter:
    def __init__(self, core, config: ServerConfig, *, metrics=None) -> None:
        """`core` is an EngineCore; `metrics` an EngineMetrics or None. Both
        engine clients (the process and the in-process one) build it from the
        same configuration, so they admit, time out and break alike."""
        self.core = core
        self.metrics = metrics
        self.circuit = CircuitBreaker(failures=config.circuit_failures, cooldown_s=config.circuit_cooldown_s)
        self.recent_ids = RecentRequestIds(config.dedup_window_s)
        self.max_queue = config.max_queue
        self.request_timeout_s = config.request_timeout_s
        self.draining = False
        self.live: dict[str, _Live] = {}

    def owned_by(self, slot: int) -> list[str]:
        return [rid for rid, live in self.live.items() if live.slot == slot]

    # ---- worker -> engine ---------------------------------------------------
    def submit(self, slot: int, msg: Submit) -> list[Reply]:
        rid = msg.request_id
        refusal = self._refusal(rid)
        if refusal is not None:
            return [(slot, Rejected(rid, *refusal))]
        submitted_at = msg.submit_time_ns / 1e9
        try:
            self.core.add_request(rid, list(msg.prompt_token_ids), msg.params,
                                  deadline=submitted_at + self.request_timeout_s)
        except ValueError as error:
            self.circuit.request_done(rid, succeeded=False)  # a half-open probe that never ran
            return [(slot, Rejected(rid, RejectReason.INVALID, str(error)))]
        # Only an admitted request consumes its id: a refused one may be retried.
        self.recent_ids.add(rid)
        self.live[rid] = _Live(slot, len(msg.prompt_token_ids), submitted_at, msg.trace_context)
        return [(slot, Tokens(rid, []))]

    def reject(self, slot: int, request_id: str, reason: RejectReason, message: str) -> list[Reply]:
        """Refuse a SUBMIT that never got to `submit` (an undecodable frame)."""
        return [(slot, Rejected(request_id, reason, message))]

    def cancel(self, slot: int, msg: Cancel) -> list[Reply]:
        """FINISHED(cancelled) to the owners, then CANCEL_ACK (found or not) to
        the sender. With `all_choices` (a DELETE) every live choice of the
        request goes: a scan of the live table, which DELETEs can afford.
        With `withdraw` the id is free again, running or not."""
        rid = msg.request_id
        targets = [r for r in self.live if is_choice_of(r, rid)] if msg.all_choices else [rid]
        replies: list[Reply] = []
        for target in targets:
            if msg.withdraw:
                self.recent_ids.discard(target)
            live = self.live.pop(target, None)
            if live is None:
                continue
            self.core.abort(target)
            self.circuit.request_done(target, succeeded=False)
            replies.append((live.slot, self._finished(target, live, FinishReason.CANCELLED)))
        return replies + [(slot, CancelAck(msg.reply_tag, bool(replies)))]

    def _refusal(self, rid: str) -> tuple[RejectReason, str] | None:
        if self.draining:
            return RejectReason.DRAINING, "the engine is shutting down and admits no new requests"
        if rid in self.live or rid in self.recent_ids:
            return RejectReason.DUPLICATE_ID, f"request id {rid!r} was used recently"
        if self.core.num_waiting >= self.max_queue:
            return RejectReason.QUEUE_FULL, f"the engine queue is full ({self.max_queue} requests waiting)"
        circuit_open = self.circuit.admit(rid)  # last: in HALF_OPEN this makes `rid` the probe
        if circuit_open is not None:
            return RejectReason.NOT_READY, circuit_open
        return None

    # ---- engine -> worker ---------------------------------------------------
    def step(self) -> list[Reply]:
        """One EngineCore step; -> the replies for its outputs."""
        steps_before, prepared_before = self.core.stats.steps, self.core.stats.steps_prepared_ahead
        started = time.perf_counter()
        outputs = self.core.step()
        failed = any(out.finish_reason == "error" for out in outputs)
        if failed or self.core.stats.steps > steps_before:
            self.circuit.step_done(failed=failed)
        if self.metrics is not None:
            if self.core.stats.steps > steps_before:
                self.metrics.observe_step(time.perf_counter() - started,
                                          prepared_ahead=self.core.stats.steps_prepared_ahead > prepared_before)
            for seconds in self.core.drain_queue_times():
                self.metrics.queue_time.observe(seconds)
        else:
            self.core.drain_queue_times()  # the core keeps them until asked
        return self.route(outputs)

    def route(self, outputs) -> list[Reply]:
        """Replies for the RequestOutputs of one step."""
        self._mark_started()
        replies: list[Reply] = []
        for out in outputs:
            live = self.live.get(out.request_id)
            if live is None:
                continue  # warm-up, or cancelled before this step
            live.steps = out.num_steps
            live.completion_tokens = out.num_generated_tokens
            if out.new_token_ids:
                replies.append((live.slot, Tokens(out.request_id, out.new_token_ids)))
            if out.finish_reason is None:
                continue
            del self.live[out.request_id]
            self.circuit.request_done(out.request_id, succeeded=out.finish_reason in ("stop", "length"))
            if out.finish_reason == "error":
                replies.append((live.slot, Error(out.request_id, out.error or "generation failed")))
                continue
            if out.finish_reason == "abort" and self.metrics is not None:
                self.metrics.cancelled.labels(reason="deadline").inc()
            replies.append((live.slot, self._finished(out.request_id, live, _FINISH_REASONS[out.finish_reason])))
        return replies

    def drop_worker(self, slot: int, reason: str) -> list[str]:
        """The worker is gone: abort its requests, nobody to answer."""
        dropped = self.owned_by(slot)
        for rid in dropped:
            del self.live[rid]
            self.core.abort(rid)
            self.circuit.request_done(rid, succeeded=False)
        if dropped and self.metrics is not None:
            self.metrics.cancelled.labels(reason=reason).inc(len(dropped))
        return dropped

    def table_sizes(self) -> dict[str, int]:
        """For `dfastllm:internal_entries`: the requests the engine holds
        (empty again once they end) and the ids of the dedup window (bounded
        by the window and by `RecentRequestIds.max_ids`)."""
        return {"engine_live_requests": len(self.live), "engine_scheduled_requests": len(self.core.scheduler.live),
                "engine_recent_ids": len(self.recent_ids)}

    def fail_all(self, message: str) -> list[Reply]:
        """Abort everything still live with ERROR (drain timeout, shutdown)."""
        replies = []
        for rid, live in self.live.items():
            self.core.abort(rid)
            self.circuit.request_done(rid, succeeded=False)
            replies.append((live.slot, Error(rid, message)))
        self.live.clear()
        return replies

    def _finished(self, rid: str, live: _Live, reason: FinishReason) -> Finished:
        now = time.monotonic()
        started = live.started_at if live.started_at is not None else now
        if self.metrics is not None:
            self.metrics.observe_finished(live.completion_tokens, live.steps)
        if live.trace_context:
            _record_spans(live, started, now)
        return Finished(rid, reason, live.prompt_tokens, live.completion_tokens, live.steps,
                        queue_time=max(0.0, started - live.submitted_at), run_time=now - started)

    def _mark_started(self) -> None:
        """Stamp requests that ran their first step, for FINISHED's queue and
        run times. RequestOutput does not carry it, so this reads the
        scheduler's running list, whose requests record `first_step_at`."""
        for request in self.core.scheduler.running:
            live = self.live.get(request.request_id)
            if live is not None and live.started_at is None and request.first_step_at is not None:
                live.started_at = request.first_step_at


def _record_spans(live: _Live, started: float, finished: float) -> None:
    """The engine's queue and generation spans under the worker's trace."""
    to_wall_ns = time.time_ns() - time.monotonic_ns()
    queue_start, run_start, run_end = (int(t * 1e9) + to_wall_ns for t in (live.submitted_at, started, finished))
    tracing.record_span("engine.queue", traceparent=live.trace_context, start_ns=queue_start, end_ns=run_start)
    tracing.record_span("engine.generate", traceparent=live.trace_context, start_ns=run_start, end_ns=run_end,
                        attributes={"prompt_tokens": live.prompt_tokens,
                                    "completion_tokens": live.completion_tokens, "steps": live.steps})
