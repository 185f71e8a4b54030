"""413 for a declared body over the limit, before a byte of it is read.
(Chunked bodies are capped as they arrive, by `RequestChannel`.)"""

from __future__ import annotations

from server.errors import RequestTooLarge


class BodyLimit:
    def __init__(self, max_body_bytes: int):
        self.max_body_bytes = max_body_bytes

    async def process_request(self, req, resp) -> None:
        if (req.content_length or 0) > self.max_body_bytes:
            raise RequestTooLarge(self.max_body_bytes)
