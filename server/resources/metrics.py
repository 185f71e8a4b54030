"""GET /metrics: Prometheus text of every worker and the engine."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

from server.metrics import render


class Metrics:
    def __init__(self, state):
        self.state = state

    async def on_get(self, req, resp) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = render(self.state.metrics, self.state.engine)
