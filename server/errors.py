"""Error types of the HTTP API and the one handler that turns any exception
into the OpenAI error body.

Every error response is `{"error": {"message", "type", "param", "code"}}`.
Messages never carry a stack trace, and any piece of client input they quote
goes through `clip()` first, so a response never echoes more than 200
characters of what the client sent.
"""

from __future__ import annotations

import logging

import falcon
import orjson

from dfastllm.engine.client import EngineRejected, EngineUnavailable
from dfastllm.ipc.messages import RejectReason

log = logging.getLogger(__name__)

MAX_ECHO_CHARS = 200
# How long a client should wait before retrying a 503.
RETRY_AFTER_S = 1


def clip(value, limit: int = 64) -> str:
    """Client input shown in a message: at most `limit` characters (<= 200)."""
    text = value if isinstance(value, str) else repr(value)
    limit = min(limit, MAX_ECHO_CHARS)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ApiError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}
        # Top-level fields beside "error" (the readiness probe's engine state).
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                **self.extra}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})  # the scheme to answer with (RFC 6750)
        super().__init__(message, **kwargs)


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    type = "conflict_error"
    default_code = "duplicate_request_id"


class _BodyLeftUnread(ApiError):
    """Sent before the whole body was read: the rest of it is never read, so
    the connection cannot be reused."""

    def __init__(self, message: str):
        super().__init__(message, headers={"Connection": "close"})


class RequestTooLarge(_BodyLeftUnread):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


class RequestTimeout(_BodyLeftUnread):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"

    def __init__(self, body_timeout_s: float):
        super().__init__(f"The request body did not arrive within {body_timeout_s:g} s.")


class IncompleteBody(InvalidRequest):
    default_code = "incomplete_body"

    def __init__(self, received: int, declared: int | None):
        what = (f"after {received} of the {declared} bytes its Content-Length declared" if declared is not None
                else "before its last chunk")
        super().__init__(f"The client closed its side of the connection and the request body ended {what}.",
                         headers={"Connection": "close"})


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class Unavailable(ApiError):
    status = 503
    type = "service_unavailable_error"
    default_code = "engine_unavailable"

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("headers", {"Retry-After": str(RETRY_AFTER_S)})
        super().__init__(message, **kwargs)


class ShuttingDown(Unavailable):
    default_code = "server_shutting_down"


class InternalError(ApiError):
    status = 500
    type = "server_error"
    default_code = "internal_error"


def from_falcon(error: falcon.HTTPError) -> ApiError:
    """Falcon's own errors (no route, wrong method, a malformed header)."""
    if error.status_code == 404:
        return NotFound("Unknown route. See /openapi.json for the routes this server offers.",
                        code="route_not_found")
    if error.status_code == 405:
        return MethodNotAllowed("Method not allowed on this route.", headers=dict(error.headers or {}))
    if error.status_code == 400:
        return InvalidRequest(clip(error.description or error.title or "Bad request.", MAX_ECHO_CHARS))
    error_type = InternalError if error.status_code >= 500 else InvalidRequest
    api_error = error_type(error.title or "Error.", headers=dict(error.headers or {}))
    api_error.status = error.status_code
    return api_error


def from_engine(error: EngineRejected | EngineUnavailable) -> ApiError:
    """The engine refused a request before admitting it, or is not there."""
    if isinstance(error, EngineUnavailable):
        return Unavailable("The engine is not available; retry shortly.")
    if error.reason == RejectReason.DUPLICATE_ID:
        return Conflict("This request id was used recently; send a new X-Request-ID.", param="X-Request-ID")
    if error.reason == RejectReason.QUEUE_FULL:
        return Unavailable("The server is overloaded; retry shortly.", code="overloaded")
    if error.reason in (RejectReason.DRAINING, RejectReason.NOT_READY):
        return Unavailable("The engine is not taking requests now (starting or shutting down).")
    return InvalidRequest(clip(error.message or "The engine refused the request.", MAX_ECHO_CHARS))


def to_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, falcon.HTTPError):
        return from_falcon(error)
    if isinstance(error, (EngineRejected, EngineUnavailable)):
        return from_engine(error)
    log.error("unhandled error", exc_info=error)
    return InternalError("The server failed to process the request.")


async def handle_error(req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params) -> None:
    """The one error handler: every exception raised while serving a request
    (middleware, resources, body parsing, the engine client) becomes an error
    response here. (Errors after a stream's first byte go into the stream.)"""
    api_error = to_api_error(error)
    req.context.error_code = api_error.code
    resp.status = api_error.status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(api_error.body())
    for name, value in api_error.headers.items():
        resp.set_header(name, value)
