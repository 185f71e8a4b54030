"""The request's ASGI receive channel, watched from outside Falcon.

Falcon reads the body through `receive` and never looks at it again, and
neither it nor Granian tells a streaming generator that the client left.
`ChannelApp` wraps the Falcon app and gives each HTTP request a
`RequestChannel` (in `scope`, see `channel_of`) that

- hands the app at most `max_body_bytes` of body, chunked or not: past the
  limit it stops reading and reports the body as ended, so nothing beyond
  the limit is read or buffered (`read_body` then raises 413);
- gives the whole body `body_timeout_s` from the request's arrival, declared
  or chunked, however it trickles in: past the deadline it stops reading and
  reports the body as ended (`read_body` then raises 408, and the response
  closes the connection), so a slow or never-ending body holds a socket for
  that long at most;
- tells a body cut short from a complete one: Granian reports a client that
  closed (or half-closed) its side before the end of the body as
  `http.disconnect` where the next `http.request` would be; the channel
  reports the body as ended and `read_body` raises 400, so a truncated body
  never reaches the engine;
- after the body, watches the raw channel for `http.disconnect` and calls
  the callbacks registered with `on_disconnect` at once (cancel the engine
  requests), whether the response streams or not.
"""

from __future__ import annotations

import asyncio

from server.errors import IncompleteBody, RequestTimeout, RequestTooLarge

SCOPE_KEY = "dfastllm.channel"
_BODY_END = {"type": "http.request", "body": b"", "more_body": False}


class RequestChannel:
    def __init__(self, receive, max_body_bytes: int, body_timeout_s: float, declared_length: int | None = None):
        self._receive = receive
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.body_deadline = asyncio.get_running_loop().time() + body_timeout_s
        self.body_bytes = 0
        self.timed_out = False  # the body was not all there by the deadline
        self.truncated = False  # the client closed its side before the end of the body
        # Falcon waits for the first body chunk before it runs any middleware; a
        # client that declared too much may be waiting for our answer before it
        # sends one (`BodyLimit` answers 413 from the declared length).
        self.too_large = declared_length is not None and declared_length > max_body_bytes
        self.declared_length = declared_length
        self.body_done = False
        self.disconnected = asyncio.Event()
        self._callbacks: list = []
        self._watcher: asyncio.Task | None = None

    async def receive(self) -> dict:
        """What the app sees: the body up to the limit, then (if asked) the disconnect."""
        if self.too_large:
            return _BODY_END
        if self.body_done or self._watcher is not None:
            self._watch()
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        if self.timed_out or self.truncated:
            return _BODY_END
        try:
            async with asyncio.timeout_at(self.body_deadline):
                event = await self._receive()
        except TimeoutError:
            self.timed_out = True
            return _BODY_END
        if event["type"] == "http.disconnect":
            self.truncated = True
            self._disconnect()
            return _BODY_END
        self.body_bytes += len(event.get("body", b""))
        if self.body_bytes > self.max_body_bytes:
            self.too_large = True
            return _BODY_END
        # Falcon stops reading once it has the declared length, so the server's
        # closing (empty) event may still be pending: the watcher skips it.
        self.body_done = not event.get("more_body", False) or self.body_bytes == self.declared_length
        return event

    def on_disconnect(self, callback) -> None:
        """Call `callback()` as soon as the client disconnects (at once if it
        has). Only after the app has read the body: from then on the watcher
        owns the raw channel."""
        if self.disconnected.is_set():
            callback()
            return
        self._callbacks.append(callback)
        self._watch()

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_disconnect())

    async def _watch_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass  # the end of a body the app already has
        self._disconnect()

    def _disconnect(self) -> None:
        if self.disconnected.is_set():
            return
        self.disconnected.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        """The response is done: stop watching."""
        if self._watcher is not None:
            self._watcher.cancel()


class ChannelApp:
    """ASGI wrapper: a `RequestChannel` for each HTTP request."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        channel = RequestChannel(receive, self.max_body_bytes, self.body_timeout_s, _content_length(scope))
        scope[SCOPE_KEY] = channel
        try:
            await self.app(scope, channel.receive, send)
        finally:
            channel.close()


def _content_length(scope) -> int | None:
    # ASGI allows iterables (of iterables) here: keep lists so that Falcon can read them too.
    scope["headers"] = [tuple(pair) for pair in scope.get("headers", ())]
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def channel_of(req) -> RequestChannel:
    return req.scope[SCOPE_KEY]


async def read_body(req) -> bytes:
    """The whole body; 413 if it is over the limit (declared lengths are
    refused earlier, by `BodyLimit`, before anything is read), 408 if it did
    not arrive in time, 400 if the client ended it early."""
    body = await req.stream.readall()
    channel = channel_of(req)
    if channel.too_large:
        raise RequestTooLarge(channel.max_body_bytes)
    if channel.timed_out:
        raise RequestTimeout(channel.body_timeout_s)
    if channel.truncated:
        raise IncompleteBody(len(body), channel.declared_length)
    return body
