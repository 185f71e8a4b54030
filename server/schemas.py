"""Request bodies of the API as pydantic models, with the contract's bounds.

All validation of a body happens here, before anything reaches the engine:
types are strict (no "5" for 5), unknown fields are refused, and the limits
that are configurable (prompt length, message count, the served model name)
come in through the validation context (`Limits`). `parse()` turns the first
pydantic error into an `InvalidRequest` (or `NotFound` for an unknown model)
that never quotes more than a short clip of the input.

The models' JSON schemas are the request bodies of the OpenAPI document
(`server.openapi`), so they say all that validation checks: the fields a
configured limit bounds carry a marker (`_limited`) that the document turns
into the running server's value, and each check across fields is stated
beside its validator as a JSON-schema rule (`schema_rules`).

The response shapes live in `server.responses`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar, Literal

from typing_extensions import TypedDict

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dfastllm.sampling_params import MAX_POST_STEPS, alg_conflict
from server.errors import ApiError, InvalidRequest, NotFound, clip

MAX_N = 8
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
# A completions `prompt` list fans out into one engine request per entry and
# choice; beyond this a client should send separate requests.
MAX_PROMPTS = 32
SEED_LIMIT = 2**63


@dataclasses.dataclass(frozen=True)
class Limits:
    """What validation needs from the running server (validation context)."""

    model: str
    max_prompt_chars: int
    max_messages: int
    default_max_tokens: int
    vocab_size: int


# OpenAI fields the engine cannot honour: accepted only at their neutral
# value, which many clients send by default; anything else is a 400, never
# silently ignored.
def _is_none(v):
    return v is None


def _is_zero(v):
    return v is None or (type(v) in (int, float) and v == 0)


def _is_false(v):
    return v is None or v is False


def _is_empty(v):
    return v is None or v == {} or v == []


NEUTRAL_COMMON = {
    "frequency_penalty": _is_zero,
    "presence_penalty": _is_zero,
    "logit_bias": _is_empty,
    "logprobs": _is_false,
}
NEUTRAL_COMPLETION = {
    **NEUTRAL_COMMON,
    "echo": _is_false,
    "best_of": lambda v: v is None or (type(v) is int and v == 1),
    "suffix": lambda v: v is None or v == "",
}
NEUTRAL_CHAT = {
    **NEUTRAL_COMMON,
    "top_logprobs": lambda v: v is None or (type(v) is int and v == 0),
    "tools": _is_empty,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _is_empty,
    "function_call": lambda v: v is None or v == "none",
    # Without tools there is nothing to call in parallel: any boolean is honoured.
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "store": _is_false,
    "metadata": _is_empty,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _is_none,
    "prediction": _is_none,
    "reasoning_effort": _is_none,
    "web_search_options": _is_none,
}


def _drop_neutral(data, neutral: dict):
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name, is_neutral in neutral.items():
        if name in data:
            value = data.pop(name)
            if not is_neutral(value):
                raise PydanticCustomError(
                    "unsupported_value", "{name} is not supported by this server; omit it or send its neutral "
                    "value (null)", {"name": name})
    return data


def _context(info: ValidationInfo) -> Limits:
    return info.context["limits"]


def _integral(value):
    """JSON has one kind of number: 5.0 is the integer 5 (as JSON Schema reads
    it, and many clients write it); 5.5 and "5" stay errors."""
    return int(value) if type(value) is float and value.is_integer() else value


# After the bounds in an Annotated int (before them, pydantic's JSON schema loses their names).
INTEGRAL = BeforeValidator(_integral)

# The key that marks a field bounded by a configured limit in a JSON schema.
LIMIT_KEY = "x-dfastllm-limit"


def _limited(limit: str):
    """A field bounded by `Limits.<limit>` (the served model's name, a
    length, the vocabulary), which validation reads from its context."""
    return Field(json_schema_extra={LIMIT_KEY: limit})


def _state_rules(schema: dict, cls) -> None:
    if cls.schema_rules:
        schema["allOf"] = list(cls.schema_rules)


def _not_null(name: str) -> dict:
    """JSON schema: `name` is present and not null."""
    return {"properties": {name: {"not": {"type": "null"}}}, "required": [name]}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_state_rules)
    # The checks across fields that the model validators make, as JSON schema.
    schema_rules: ClassVar[tuple[dict, ...]] = ()

    @classmethod
    def from_body(cls, body: bytes, limits: Limits):
        return parse(cls, body, limits)


class StreamOptions(_Strict):
    include_usage: bool | None = False


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
STREAM_OPTIONS_RULE = {"description": "stream_options only with stream: true",
                       "anyOf": [{"properties": {"stream": {"const": True}}, "required": ["stream"]},
                                 {"properties": {"stream_options": {"type": "null"}}}]}


class _Generation(_Strict):
    """Fields shared by completions and chat completions."""

    prompt_param: ClassVar[str]  # the field that holds the prompt, for errors about it
    schema_rules = (STREAM_OPTIONS_RULE,)
    model: Annotated[str, _limited("model")]
    n: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] | None = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stop: StopStrings | None = None
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT), INTEGRAL] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Diffusion extensions (LLaDA's generate() arguments).
    steps: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    block_length: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    remasking: Literal["low_confidence", "random"] | None = None
    threshold: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    # vLLM's top_k (-1 or 0: all tokens), and Dream's diffusion_generate()
    # arguments, for a Dream model with block_length omitted.
    top_k: Annotated[int, Field(ge=-1, description="keep the k most likely tokens; -1 or 0: all"), INTEGRAL] | None = None
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy"] | None = Field(
        None, description="Dream's own decoding (a Dream model, block_length omitted): which confidence picks the "
                          "cells to commit; default entropy, maskgit_plus with threshold")
    alg_temp: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = Field(
        None, description="Dream: > 0 draws the cells from softmax(confidence / alg_temp) instead of the top ones")
    eps: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] | None = Field(
        None, description="Dream: the schedule's last timestep, linspace(1, eps, steps + 1); default 0.001")
    # LLaDA2.1's token editing (LLaDA2 models only; default: the checkpoint's generation_config.json).
    editing_threshold: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = Field(
        None, description="LLaDA2: rewrite a committed cell of the current block whose new sample differs with "
                          "confidence above this (LLaDA2.1 editing)")
    max_post_steps: Annotated[int, Field(ge=0, le=MAX_POST_STEPS), INTEGRAL] | None = Field(
        None, description="LLaDA2.1 editing: most steps a block runs after it has no mask left")
    # vLLM extension: generate exactly max_tokens (benchmarks).
    ignore_eos: bool | None = False

    @field_validator("model")
    @classmethod
    def _served_model(cls, model: str, info: ValidationInfo) -> str:
        return _check_served_model(model, info)

    @field_validator("stop", mode="before", json_schema_input_type=StopString | StopStrings | None)
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("invalid_value", "stream_options is only allowed with stream: true")
        max_tokens = self.requested_max_tokens or _context(info).default_max_tokens
        for name in ("steps", "block_length"):
            value = getattr(self, name)
            if value is not None and value > max_tokens:
                raise PydanticCustomError("invalid_value", "{name} must be <= max_tokens ({max_tokens}), got {value}",
                                          {"name": name, "max_tokens": max_tokens, "value": value})
        conflict = alg_conflict(self.alg, self.alg_temp, self.threshold)
        if conflict is not None:
            raise PydanticCustomError("invalid_value", "{message}", {"name": conflict[0], "message": conflict[1]})
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _check_served_model(model: str | None, info: ValidationInfo) -> str | None:
    if model is not None and model != _context(info).model:
        raise PydanticCustomError("model_not_found", "The model '{model}' does not exist.", {"model": clip(model)})
    return model


def _check_message_count(messages: list | None, info: ValidationInfo) -> list | None:
    limit = _context(info).max_messages
    if messages is not None and len(messages) > limit:
        raise PydanticCustomError("invalid_value", "{count} messages, more than the limit of {limit}",
                                  {"count": len(messages), "limit": limit})
    return messages


def _check_prompt_chars(text: str, info: ValidationInfo, what: str) -> str:
    limit = _context(info).max_prompt_chars
    if len(text) > limit:
        raise PydanticCustomError("invalid_value", "{what} is {length} characters, more than the limit of {limit}",
                                  {"what": what, "length": len(text), "limit": limit})
    return text


Prompt = Annotated[str, Field(min_length=1), _limited("max_prompt_chars")]
Prompts = Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]


class CompletionRequest(_Generation):
    prompt_param = "prompt"
    prompt: Prompts
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return _drop_neutral(data, NEUTRAL_COMPLETION)

    @field_validator("prompt", mode="before", json_schema_input_type=Prompt | Prompts)
    @classmethod
    def _prompt_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("prompt")
    @classmethod
    def _prompt_chars(cls, prompts: list[str], info: ValidationInfo) -> list[str]:
        for prompt in prompts:
            _check_prompt_chars(prompt, info, "prompt")
        return prompts


class TextPart(TypedDict):
    """A content part that can be served (the JSON schema of those `_text_parts` takes)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: Annotated[str, Field(max_length=64)] | None = None

    @field_validator("content", mode="before",
                     json_schema_input_type=Annotated[str, _limited("max_prompt_chars")] | list[TextPart])
    @classmethod
    def _text_parts(cls, content):
        """OpenAI's list of content parts; only text parts can be served."""
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) == {"type", "text"}):
                raise PydanticCustomError("invalid_value", "only text content parts "
                                          "({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("content")
    @classmethod
    def _content_chars(cls, content: str, info: ValidationInfo) -> str:
        return _check_prompt_chars(content, info, "message content")


class ChatCompletionRequest(_Generation):
    prompt_param = "messages"
    schema_rules = (*_Generation.schema_rules,
                    {"description": "max_tokens or max_completion_tokens, not both",
                     "not": {"allOf": [_not_null("max_tokens"), _not_null("max_completion_tokens")]}})
    messages: Annotated[list[ChatMessage], Field(min_length=1), _limited("max_messages")]
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return _drop_neutral(data, NEUTRAL_CHAT)

    @model_validator(mode="before")
    @classmethod
    def _one_max_tokens(cls, data):
        if isinstance(data, dict) and None not in (data.get("max_tokens"), data.get("max_completion_tokens")):
            raise PydanticCustomError("invalid_value", "send max_tokens or max_completion_tokens, not both")
        return data

    @field_validator("messages")
    @classmethod
    def _message_count(cls, messages: list, info: ValidationInfo) -> list:
        return _check_message_count(messages, info)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a completions `prompt` or chat `messages`, not both."""

    schema_rules = ({"description": "exactly one of prompt or messages",
                     "oneOf": [_not_null("prompt"), _not_null("messages")]},)
    model: Annotated[str, _limited("model")] | None = None
    prompt: Annotated[str, _limited("max_prompt_chars")] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1), _limited("max_messages")] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True

    @field_validator("model")
    @classmethod
    def _served_model(cls, model: str | None, info: ValidationInfo) -> str | None:
        return _check_served_model(model, info)

    @field_validator("prompt")
    @classmethod
    def _prompt_chars(cls, prompt: str | None, info: ValidationInfo) -> str | None:
        return prompt if prompt is None else _check_prompt_chars(prompt, info, "prompt")

    @field_validator("messages")
    @classmethod
    def _message_count(cls, messages, info: ValidationInfo):
        return _check_message_count(messages, info)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("invalid_value", "send exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: Annotated[str, _limited("model")] | None = None
    tokens: list[Annotated[int, Field(ge=0), INTEGRAL, _limited("vocab_size")]]

    @field_validator("model")
    @classmethod
    def _served_model(cls, model: str | None, info: ValidationInfo) -> str | None:
        return _check_served_model(model, info)

    @field_validator("tokens")
    @classmethod
    def _in_vocab(cls, tokens: list[int], info: ValidationInfo) -> list[int]:
        vocab_size = _context(info).vocab_size
        for i, token in enumerate(tokens):
            if token >= vocab_size:
                raise PydanticCustomError("invalid_value", "tokens[{i}] = {token} is outside the vocabulary "
                                          "(size {vocab_size})", {"i": i, "token": token, "vocab_size": vocab_size})
        return tokens


# --- parsing ---------------------------------------------------------------

def parse(model: type[BaseModel], body: bytes, limits: Limits | None = None):
    """Validate a JSON body; the first problem becomes the API error. (Only
    the request models of generation and tokenization need `limits`.)"""
    try:
        return model.model_validate_json(body, strict=True, context={"limits": limits})
    except pydantic.ValidationError as error:
        raise as_api_error(error.errors(include_url=False, include_input=False)[0]) from None


def as_api_error(error: dict) -> ApiError:
    kind = error["type"]
    param = _param(error["loc"]) or None
    if kind == "json_invalid":
        return InvalidRequest(f"The body is not valid JSON ({clip(error['ctx'].get('error', ''), 120)}).",
                              code="invalid_json")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param,
                              code="unknown_parameter")
    if kind == "model_not_found":
        return NotFound(error["msg"], param="model", code="model_not_found")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: {param}", param=param, code="missing_parameter")
    code = "unsupported_value" if kind == "unsupported_value" else "invalid_value"
    # Checks across fields name the field they refused in their context.
    param = param or error.get("ctx", {}).get("name")
    message = clip(error["msg"], 150)
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return InvalidRequest(message, param=param, code=code)


def _param(loc: tuple) -> str:
    """('messages', 2, 'content') -> 'messages[2].content', clipped (field names come from the client)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return clip(text)
