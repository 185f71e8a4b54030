"""The end of every request: its audit record, the shared service time for
load shedding, the table sizes, and a debug log line.

`RequestLog` runs right after request identity, so it sees every request,
those refused by any later stage included. A request ends when its
response is complete: in `process_response`, or for a streamed response
when the stream ends (Falcon closes the stream after the last chunk or an
error, and the wrapper's `close` runs then).

The audit log (`--audit-log PATH`, or `-` for stdout) gets one JSON line
per request and per admin action: time, request id, key id (a hash prefix,
never the key), client address, method and path, status, model, prompt and
completion tokens, duration, and the request's `user` field when the
resource recorded it in `req.context.user`. Every worker opens the file
with O_APPEND and writes each line with one write(), so lines from several
workers never interleave. Prompt and completion text never go there.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import orjson

from server.errors import MAX_ECHO_CHARS, clip
from server.metrics import RequestUsage, request_usage
from server.middleware.channel import channel_of
from server.middleware.http_metrics import GENERATION_PATHS

log = logging.getLogger(__name__)
audit_log = logging.getLogger("dfastllm.audit")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class AuditSink:
    """Where audit lines go: a file opened for appending, stdout, or nowhere."""

    def __init__(self, fd: int | None):
        self.fd = fd
        self._failed = False

    @classmethod
    def open(cls, path: str | None) -> AuditSink:
        if path is None:
            return cls(None)
        if path == "-":
            return cls(1)
        return cls(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))

    @property
    def enabled(self) -> bool:
        return self.fd is not None

    def write(self, record: dict) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, orjson.dumps(record, default=str) + b"\n")  # one write: one whole line
            self._failed = False
        except OSError as error:
            if not self._failed:  # once per outage, not once per request
                log.error("cannot write the audit log: %s", error)
            self._failed = True


class RequestLog:
    """Falcon middleware; see the module doc. `on_generation_done(seconds)`
    gets the duration of every successful generation."""

    def __init__(self, state, sink: AuditSink, proxies, *, tables, on_generation_done):
        self.state = state
        self.sink = sink
        self.proxies = proxies
        self.tables = tables  # () -> {table name: entries}
        self.on_generation_done = on_generation_done

    async def process_request(self, req, resp) -> None:
        req.context.usage = RequestUsage()
        request_usage.set(req.context.usage)

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        if resp.stream is not None:
            resp.stream = _ClosingStream(resp.stream, lambda: self._done(req, resp))
        else:
            self._done(req, resp)

    def _done(self, req, resp) -> None:
        started = getattr(req.context, "started", None)
        duration = time.perf_counter() - started if started is not None else 0.0
        usage = getattr(req.context, "usage", None) or RequestUsage()
        path = clip(req.path, MAX_ECHO_CHARS)
        generation = req.path in GENERATION_PATHS and getattr(req.context, "admitted", False)
        # A client that left early says nothing about how long a generation takes.
        if generation and resp.status_code == 200 and not channel_of(req).disconnected.is_set():
            self.on_generation_done(duration)
        self.state.metrics.observe_tables(self.tables())
        if self.sink.enabled:
            self.sink.write({
                "time": _now_iso(), "event": "request", "request_id": getattr(req.context, "request_id", None),
                "key_id": getattr(req.context, "key_id", None), "client": self.proxies.client_address(req),
                "method": req.method, "path": path, "status": resp.status_code,
                "model": self.state.model.name if req.path in GENERATION_PATHS else None,
                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "duration_s": round(duration, 6), "user": getattr(req.context, "user", None), "pid": os.getpid(),
            })
        log.debug("request done", extra={"method": req.method, "path": path, "status": resp.status_code,
                                         "duration_s": round(duration, 6), "prompt_tokens": usage.prompt_tokens,
                                         "completion_tokens": usage.completion_tokens})

    def admin_action(self, req, action: str, *, before: dict, after: dict, **fields) -> None:
        """One audit line (and one info log line) for an admin change."""
        record = {"time": _now_iso(), "event": "admin", "action": action,
                  "request_id": getattr(req.context, "request_id", None),
                  "key_id": getattr(req.context, "key_id", None), "client": self.proxies.client_address(req),
                  "before": before, "after": after, "pid": os.getpid(), **fields}
        self.sink.write(record)
        audit_log.info("admin action: %s", action, extra={"before": before, "after": after, **fields})


class _ClosingStream:
    """A response stream that calls `on_close` once when Falcon closes it."""

    def __init__(self, stream, on_close):
        self._stream = stream
        self._on_close = on_close

    def __aiter__(self):
        return self._stream.__aiter__()

    async def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            closer = getattr(self._stream, "aclose", None) or getattr(self._stream, "close", None)
            if closer is not None:
                await closer()
        finally:
            if on_close is not None:
                on_close()
