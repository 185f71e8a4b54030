"""Probes: /health/live (the process runs) and /health/ready, /health (the
engine is loaded, warmed up, heartbeating and not draining)."""

from __future__ import annotations

from server.errors import Unavailable

# The engine beats at least every 0.5 s; this much silence means it is stuck or gone.
HEARTBEAT_STALE_S = 5.0


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
        if name != "ready" or engine.heartbeat_age > HEARTBEAT_STALE_S:
            status = name if name != "ready" else "unresponsive"
            raise Unavailable(f"The engine is not ready (state: {status}).", extra={**fields, "state": status})
        resp.media = {"status": "ready", **fields}
