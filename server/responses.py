"""Response shapes, as pydantic models: the OpenAPI document is generated
from them, and the tests validate every body the server sends against them.
(The resources build plain dicts and serialize them with orjson; these
models are not on the hot path.)"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

FinishReason = Literal["stop", "length", "cancelled", "error"]


class _Exact(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Exact):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    # Readiness adds the engine state beside the error.
    model_config = ConfigDict(extra="allow")
    error: ErrorDetail


class Usage(_Exact):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Exact):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class CompletionResponse(_Exact):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Exact):
    """One SSE event of a streamed completion; `usage` only with include_usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(_Exact):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Exact):
    index: int
    message: ChatMessageOut
    logprobs: None
    finish_reason: FinishReason


class ChatCompletionResponse(_Exact):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Exact):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Exact):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Exact):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Exact):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(_Exact):
    object: Literal["list"]
    data: list[ModelCard]


class RequestCancelled(_Exact):
    id: str
    object: Literal["request.cancelled"]
    cancelled: bool


class TokenizeResponse(_Exact):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Exact):
    prompt: str


class Liveness(_Exact):
    status: Literal["alive"]


class Readiness(_Exact):
    status: Literal["ready"]
    state: str
    heartbeat_age_s: float


class VersionInfo(_Exact):
    version: str
    api_versions: list[str]
