"""The OpenAPI 3.1 document of the API, generated from the request models
(`server.schemas`) and the response models (`server.responses`). Served at
GET /openapi.json; a test checks it against the app's routes."""

from __future__ import annotations

import dfastllm
from server import responses, schemas
from server.resources import admin

# (method, path) -> (summary, request model or None, response model, auth?)
OPERATIONS = {
    ("post", "/v1/completions"): ("Text completion (stream: true for SSE of CompletionChunk)",
                                  schemas.CompletionRequest, responses.CompletionResponse, True),
    ("post", "/v1/chat/completions"): ("Chat completion (stream: true for SSE of ChatCompletionChunk)",
                                       schemas.ChatCompletionRequest, responses.ChatCompletionResponse, True),
    ("get", "/v1/models"): ("The served model", None, responses.ModelList, True),
    ("get", "/v1/models/{model_id}"): ("One model card", None, responses.ModelCard, True),
    ("delete", "/v1/requests/{request_id}"): ("Cancel a running or queued request", None,
                                              responses.RequestCancelled, True),
    ("post", "/v1/tokenize"): ("Tokenize a prompt or chat messages", schemas.TokenizeRequest,
                               responses.TokenizeResponse, True),
    ("post", "/v1/detokenize"): ("Token ids to text", schemas.DetokenizeRequest, responses.DetokenizeResponse,
                                 True),
    ("get", "/health/live"): ("Liveness: the HTTP process runs", None, responses.Liveness, False),
    ("get", "/health/ready"): ("Readiness: the engine is ready (503 otherwise)", None, responses.Readiness, False),
    ("get", "/health"): ("Same as /health/ready", None, responses.Readiness, False),
    ("get", "/metrics"): ("Prometheus text of all workers and the engine", None, None, False),
    ("get", "/version"): ("Package and API versions", None, responses.VersionInfo, False),
    ("get", "/openapi.json"): ("This document", None, None, False),
    ("get", "/admin/config"): ("Runtime-tunable settings (admin key)", None, admin.AdminConfigResponse, True),
    ("patch", "/admin/config"): ("Change runtime-tunable settings on every worker and the engine (admin key)",
                                 admin.RuntimeSettingsPatch, admin.AdminConfigResponse, True),
}
STREAM_CHUNKS = (responses.CompletionChunk, responses.ChatCompletionChunk)


def openapi_document(model_name: str) -> dict:
    schemas_out: dict = {}

    def ref(model) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas_out.update(schema.pop("$defs", {}))
        schemas_out[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"description": "Error", "content": {"application/json": {"schema": ref(responses.ErrorResponse)}}}
    for model in STREAM_CHUNKS:
        ref(model)
    paths: dict = {}
    for (method, path), (summary, request_model, response_model, auth) in OPERATIONS.items():
        content = {"application/json": {"schema": ref(response_model)}} if response_model else \
            {"text/plain": {"schema": {"type": "string"}}}
        operation: dict = {"summary": summary, "responses": {"200": {"description": "OK", "content": content},
                                                              "default": error}}
        if request_model is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": ref(request_model)}}}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in ("model_id", "request_id") if "{" + name + "}" in path]
        params += [{"name": "X-Request-ID", "in": "header", "required": False,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}},
                   {"name": "X-API-Version", "in": "header", "required": False,
                    "schema": {"type": "string", "enum": list(dfastllm.API_VERSIONS)}}]
        operation["parameters"] = params
        if auth:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "dfastllm", "version": dfastllm.__version__,
                 "description": f"OpenAI-compatible API serving {model_name}."},
        "paths": paths,
        "components": {"schemas": schemas_out,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
