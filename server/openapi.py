"""The OpenAPI 3.1 document of this server, served at GET /openapi.json.

It is generated from the request models (`server.schemas`), the response
models (`server.responses`) and the running configuration, so that it says
what this server does: the served model id (an enum, so that a client or a
fuzzer reaches generation without help), the configured limits, and which
operations need which key (a security scheme only when keys are
configured). `tests/server/test_openapi_fuzz.py` holds the server to it
with schemathesis; `test_api_endpoints.py` checks it covers every route.
"""

from __future__ import annotations

import dataclasses
import typing

from pydantic import BaseModel

import dfastllm
from dfastllm.config import ServerConfig
from server import responses, schemas
from server.middleware.identity import REQUEST_ID_PATTERN
from server.resources import admin
from server.schemas import LIMIT_KEY, Limits

# Who may call an operation: anyone, an API key (when keys are configured),
# an admin key (403 without one), or like /metrics (a key with --metrics-require-key).
Access = typing.Literal["public", "key", "admin", "metrics"]


@dataclasses.dataclass(frozen=True)
class Operation:
    summary: str
    access: Access
    response: type[BaseModel] | None  # None: `media`, a string
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()  # the statuses it answers besides 200, 401, 403 and 405
    stream: type[BaseModel] | None = None  # the SSE event of `stream: true`
    media: str = "application/json"


GENERATION_ERRORS = (400, 404, 409, 413, 429, 503)
OPERATIONS = {
    ("post", "/v1/completions"): Operation("Text completion", "key", responses.CompletionResponse,
                                           schemas.CompletionRequest, GENERATION_ERRORS,
                                           stream=responses.CompletionChunk),
    ("post", "/v1/chat/completions"): Operation("Chat completion", "key", responses.ChatCompletionResponse,
                                                schemas.ChatCompletionRequest, GENERATION_ERRORS,
                                                stream=responses.ChatCompletionChunk),
    ("get", "/v1/models"): Operation("The served model", "key", responses.ModelList, errors=(400, 429)),
    ("get", "/v1/models/{model_id}"): Operation("One model card", "key", responses.ModelCard,
                                                errors=(400, 404, 429)),
    ("delete", "/v1/requests/{request_id}"): Operation("Cancel a running or queued request", "key",
                                                       responses.RequestCancelled, errors=(400, 404, 429)),
    ("post", "/v1/tokenize"): Operation("Tokenize a prompt or chat messages", "key", responses.TokenizeResponse,
                                        schemas.TokenizeRequest, (400, 404, 413, 429)),
    ("post", "/v1/detokenize"): Operation("Token ids to text", "key", responses.DetokenizeResponse,
                                          schemas.DetokenizeRequest, (400, 404, 413, 429)),
    ("get", "/health/live"): Operation("Liveness: the HTTP process runs", "public", responses.Liveness,
                                       errors=(400,)),
    ("get", "/health/ready"): Operation("Readiness: the engine is ready (503 otherwise)", "public",
                                        responses.Readiness, errors=(400, 503)),
    ("get", "/health"): Operation("Same as /health/ready", "public", responses.Readiness, errors=(400, 503)),
    ("get", "/metrics"): Operation("Prometheus text of all workers and the engine", "metrics", None,
                                   errors=(400,), media="text/plain"),
    ("get", "/version"): Operation("Package and API versions", "public", responses.VersionInfo, errors=(400,)),
    ("get", "/openapi.json"): Operation("This document", "public", None, errors=(400,)),
    ("get", "/admin/config"): Operation("Runtime-tunable settings", "admin", admin.AdminConfigResponse,
                                        errors=(400,)),
    ("patch", "/admin/config"): Operation("Change runtime-tunable settings on every worker and the engine",
                                          "admin", admin.AdminConfigResponse, admin.RuntimeSettingsPatch,
                                          (400, 413)),
}

ERRORS = {
    400: "Invalid request: a parameter, header or the body (the error names it); a prompt and max_tokens "
         "beyond the model's context (context_length_exceeded)",
    401: "Missing or wrong API key",
    403: "Not an admin key, or no admin keys are configured (the admin API is off)",
    404: "Unknown model or request id",
    409: "X-Request-ID used in the last minutes",
    413: "Request body over the limit",
    429: "Rate limit exceeded; retry after Retry-After seconds",
    503: "Engine not ready, restarting, draining or overloaded; retry after Retry-After seconds",
}
RETRY_AFTER = (429, 503)


def openapi_document(config: ServerConfig, limits: Limits) -> dict:
    """The document of a server with this configuration and these limits."""
    components: dict = {}

    def ref(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    identity = {"X-Request-ID": {"schema": _request_id_schema()},
                "X-API-Version": {"schema": {"type": "string", "enum": list(dfastllm.API_VERSIONS)}}}
    error_body = {"application/json": {"schema": ref(responses.ErrorResponse)}}
    paths: dict = {}
    for (method, path), op in OPERATIONS.items():
        keyed = _needs_key(op.access, config)
        statuses = sorted({*op.errors, *((401,) if keyed else ()), *((403,) if op.access == "admin" else ())})
        answers = {"200": {"description": "OK", "headers": identity, "content": _content(op, ref)}}
        for status in statuses:
            headers = {**identity, **({"Retry-After": {"schema": {"type": "string"}}} if status in RETRY_AFTER
                                      else {})}
            answers[str(status)] = {"description": ERRORS[status], "headers": headers, "content": error_body}
        # Anything else (405, 500) has the same error body.
        answers["default"] = {"description": "Error", "headers": identity, "content": error_body}
        operation: dict = {"summary": op.summary, "parameters": _path_parameters(path, limits) + _identity_headers(),
                           "responses": answers}
        if op.request is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": ref(op.request)}}}
        if keyed:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = operation
    for model in OPERATIONS.values():
        if model.stream is not None:
            ref(model.stream)
    document = {
        "openapi": "3.1.0",
        "info": {"title": "dfastllm", "version": dfastllm.__version__,
                 "description": f"OpenAI-compatible API serving {limits.model}."},
        "paths": paths,
        "components": {"schemas": _with_limits(components, limits)},
    }
    if config.api_keys or config.admin_keys:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document


def _needs_key(access: Access, config: ServerConfig) -> bool:
    """As `ApiKeyAuth` decides: /v1 needs a key only when keys are
    configured, /metrics only with --metrics-require-key too, the admin API
    an admin key (and with none configured it is off: 403 to everyone)."""
    return {"public": False, "key": bool(config.api_keys), "admin": bool(config.admin_keys),
            "metrics": bool(config.api_keys) and config.metrics_require_key}[access]


def _content(op: Operation, ref) -> dict:
    if op.response is None:
        return {op.media: {"schema": {"type": "object"} if op.media == "application/json" else {"type": "string"}}}
    content = {"application/json": {"schema": ref(op.response)}}
    if op.stream is not None:
        content["text/event-stream"] = {"schema": _sse_event(ref(op.stream), ref(responses.ErrorResponse))}
    return content


def _sse_event(chunk: dict, error: dict) -> dict:
    """One server-sent event of `stream: true` (OpenAPI 3.1 describes an
    event stream by its events): a chunk, an error after the first byte, and
    last `[DONE]`."""
    return {"type": "object", "required": ["data"], "description": "With stream: true",
            "properties": {"data": {"anyOf": [
                {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, error]}},
                {"const": "[DONE]"}]}}}


def _request_id_schema() -> dict:
    return {"type": "string", "pattern": f"^{REQUEST_ID_PATTERN.pattern}$"}


def _path_parameters(path: str, limits: Limits) -> list[dict]:
    schemas_of = {"model_id": {"type": "string", "enum": [limits.model]}, "request_id": _request_id_schema()}
    return [{"name": name, "in": "path", "required": True, "schema": schema}
            for name, schema in schemas_of.items() if "{" + name + "}" in path]


def _identity_headers() -> list[dict]:
    return [{"name": "X-Request-ID", "in": "header", "required": False, "schema": _request_id_schema(),
             "description": "Your id for this request (else the server makes one); reused within minutes: 409"},
            {"name": "X-API-Version", "in": "header", "required": False,
             "schema": {"type": "string", "enum": list(dfastllm.API_VERSIONS)}}]


def _with_limits(node, limits: Limits):
    """The schemas with each configured limit's marker (`schemas._limited`) replaced by its value."""
    if isinstance(node, list):
        return [_with_limits(item, limits) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _with_limits(value, limits) for key, value in node.items()}
    limit = node.pop(LIMIT_KEY, None)
    if limit == "model":
        node["enum"] = [limits.model]
    elif limit in ("max_prompt_chars", "max_messages"):
        node["maxLength" if node["type"] == "string" else "maxItems"] = getattr(limits, limit)
    elif limit == "vocab_size":
        node["maximum"] = limits.vocab_size - 1
    elif limit is not None:
        raise ValueError(f"unknown limit {limit!r}")
    return node

