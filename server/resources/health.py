"""Probes: /health/live (the process runs) and /health/ready, /health (the
engine is loaded, warmed up, heartbeating and not draining, and its circuit
breaker is not open). "Heartbeating" is the one definition of an alive
engine that admission uses too (`EngineSnapshot.heartbeat_stale`), so
readiness drops no later than submit starts refusing."""

from __future__ import annotations

from dfastllm.ipc.rate_limit import retry_after_header
from server.errors import Unavailable
from server.middleware.admission import circuit_open


class Live:
    async def on_get(self, req, resp) -> None:
        resp.media = {"status": "alive"}


class Ready:
    def __init__(self, state):
        self.state = state

    async def on_get(self, req, resp) -> None:
        engine = self.state.engine.state()
        name = engine.state.name.lower()
        fields = {"state": name, "heartbeat_age_s": round(engine.heartbeat_age, 3)}
        if name != "ready" or engine.heartbeat_stale:
            status = name if name != "ready" else "unresponsive"
            raise Unavailable(f"The engine is not ready (state: {status}).", extra={**fields, "state": status})
        if circuit_open(engine):
            raise Unavailable("The engine's circuit breaker is open after repeated failures.",
                              headers={"Retry-After": retry_after_header(engine.circuit_retry_after_s)},
                              extra={**fields, "circuit": "open",
                                     "circuit_retry_after_s": round(engine.circuit_retry_after_s, 3)})
        resp.media = {"status": "ready", **fields}
