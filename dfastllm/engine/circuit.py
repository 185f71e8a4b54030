"""The engine's circuit breaker: stop admitting work while generation keeps
failing (out of memory, a broken device), so clients get a quick 503 with
Retry-After instead of a queue of requests that will all fail.

    CLOSED --`failures` consecutive failed steps--> OPEN
    OPEN --`cooldown_s` passed--> HALF_OPEN
    HALF_OPEN: one probe request is admitted, the rest are refused;
        the probe finishes (stop, length) -> CLOSED
        any step fails                    -> OPEN again for `cooldown_s`
        the probe is cancelled            -> HALF_OPEN, the next request probes

A step counts as failed when it ended requests with finish_reason "error"
(a failure inside EngineCore.step or while admitting into the batch), as
succeeded when it ran the batch without one. Requests already running when
the circuit opens keep running: they may well finish.

Torch-free and IO-free: the router owns one and asks it; the engine process
publishes `state` and `retry_after` in the control block.
"""

from __future__ import annotations

import logging
import time

from dfastllm.ipc.control import CircuitState

logger = logging.getLogger("dfastllm.engine.circuit")


class CircuitBreaker:
    def __init__(self, *, failures: int, cooldown_s: float, clock=time.monotonic) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError(f"circuit breaker needs failures >= 1 and cooldown_s > 0, got {failures}, {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.times_opened = 0
        self._state = CircuitState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe: str | None = None  # the request id admitted in HALF_OPEN

    @property
    def state(self) -> CircuitState:
        """The state now (OPEN turns HALF_OPEN when the cool-down is over)."""
        if self._state == CircuitState.OPEN and self.clock() >= self._opened_at + self.cooldown_s:
            self._state = CircuitState.HALF_OPEN
            self._probe = None
            logger.info("circuit half-open: the next request probes the engine")
        return self._state

    def retry_after(self) -> float:
        """Seconds until a probe is allowed; 0 unless OPEN."""
        if self.state != CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self.clock())

    def admit(self, request_id: str) -> str | None:
        """None if `request_id` may be admitted, else why not."""
        state = self.state
        if state == CircuitState.CLOSED:
            return None
        if state == CircuitState.HALF_OPEN and self._probe is None:
            self._probe = request_id
            return None
        if state == CircuitState.HALF_OPEN:
            return "the engine is recovering from repeated generation failures; a probe request is running"
        return (f"generation failed {self.failures} time(s) in a row; the engine admits no requests "
                f"for {self.retry_after():.1f} s")

    def step_done(self, *, failed: bool) -> None:
        """One EngineCore step ran; `failed`: it ended requests with an error."""
        if not failed:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        state = self.state
        if state == CircuitState.HALF_OPEN or (
                state == CircuitState.CLOSED and self._consecutive_failures >= self.failures):
            self._open()

    def request_done(self, request_id: str, *, succeeded: bool) -> None:
        """A request left the engine (`succeeded`: stop or length). Only the
        half-open probe's outcome matters; a failed one already failed its step."""
        if request_id != self._probe or self.state != CircuitState.HALF_OPEN:
            return
        self._probe = None
        if succeeded:
            self._state = CircuitState.CLOSED
            self._consecutive_failures = 0
            logger.info("circuit closed: the probe request succeeded")

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = self.clock()
        self._probe = None
        self.times_opened += 1
        logger.error("circuit open: generation failed %d time(s) in a row; refusing requests for %.1f s",
                     self._consecutive_failures, self.cooldown_s)
