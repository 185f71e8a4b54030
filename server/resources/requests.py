"""DELETE /v1/requests/{request_id}: cancel a running or queued request,
whichever worker serves it (the engine finds it by id)."""

from __future__ import annotations

from server.errors import InvalidRequest, NotFound
from server.middleware.identity import valid_request_id


class Requests:
    def __init__(self, state):
        self.state = state

    async def on_delete(self, req, resp, request_id: str) -> None:
        if not valid_request_id(request_id):
            raise InvalidRequest("A request id is 1 to 128 characters of [A-Za-z0-9._:-].", param="request_id")
        if not await self.state.engine.cancel(request_id, all_choices=True):
            raise NotFound("No running or queued request has this id.", param="request_id",
                           code="request_not_found")
        self.state.metrics.cancelled.labels("api").inc()
        resp.media = {"id": request_id, "object": "request.cancelled", "cancelled": True}
