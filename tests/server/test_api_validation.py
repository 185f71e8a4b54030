"""Every row of the contract's validation table, against the app: the
refusal's status, code and error shape, and that nothing reached the engine
(no engine request was admitted, so its id was never recorded)."""

from __future__ import annotations

import pytest

from asgi_driver import MAX_MODEL_LEN, MODEL
from server.responses import ChatCompletionResponse, CompletionResponse, ErrorResponse

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LONG = "a" * (64 * 1024 + 1)
USER = [{"role": "user", "content": "hi"}]


def completion(**fields):
    return ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields})


def chat(**fields):
    return ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2, **fields})


REFUSED = {
    # field: model
    "model unknown": (completion(model="gpt-4"), 404, "model_not_found"),
    "model missing": (("/v1/completions", {"prompt": "Hello"}), 400, "missing_parameter"),
    # prompt
    "prompt empty": (completion(prompt=""), 400, "invalid_value"),
    "prompt empty list": (completion(prompt=[]), 400, "invalid_value"),
    "prompt wrong type": (completion(prompt=5), 400, "invalid_value"),
    "prompt list item wrong type": (completion(prompt=["a", 3]), 400, "invalid_value"),
    "prompt too long": (completion(prompt=LONG), 400, "invalid_value"),
    "prompt with the mask token": (completion(prompt=["Hello", "fill <|mdm_mask|> in"]), 400, "invalid_value"),
    # messages
    "messages empty": (chat(messages=[]), 400, "invalid_value"),
    "messages too many": (chat(messages=USER * 257), 400, "invalid_value"),
    "message role unknown": (chat(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_value"),
    "message content too long": (chat(messages=[{"role": "user", "content": LONG}]), 400, "invalid_value"),
    "message with the mask token": (chat(messages=[{"role": "user", "content": "a <|mdm_mask|>"}]), 400,
                                    "invalid_value"),
    "message image part": (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                           400, "invalid_value"),
    # at the character limit the prompt passes validation; the tiny model's context is what refuses it
    "prompt at the char limit": (completion(prompt="a" * 64 * 1024), 400, "context_length_exceeded"),
    # max_tokens / max_completion_tokens
    "max_tokens zero": (completion(max_tokens=0), 400, "invalid_value"),
    "max_tokens string": (completion(max_tokens="5"), 400, "invalid_value"),
    "max_tokens float": (completion(max_tokens=1.5), 400, "invalid_value"),
    "max_tokens over context": (completion(max_tokens=MAX_MODEL_LEN), 400, "context_length_exceeded"),
    "max_completion_tokens zero": (chat(max_tokens=None, max_completion_tokens=0), 400, "invalid_value"),
    "max_completion_tokens over context": (chat(max_tokens=None, max_completion_tokens=MAX_MODEL_LEN), 400,
                                           "context_length_exceeded"),
    # temperature, top_p, n
    "temperature negative": (completion(temperature=-0.1), 400, "invalid_value"),
    "temperature over 2": (completion(temperature=2.01), 400, "invalid_value"),
    "temperature string": (completion(temperature="1"), 400, "invalid_value"),
    "top_p zero": (completion(top_p=0), 400, "invalid_value"),
    "top_p over 1": (completion(top_p=1.01), 400, "invalid_value"),
    "n zero": (completion(n=0), 400, "invalid_value"),
    "n over 8": (completion(n=9), 400, "invalid_value"),
    # stop, seed
    "stop five strings": (completion(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    "stop empty string": (completion(stop=""), 400, "invalid_value"),
    "stop too long": (completion(stop="x" * 65), 400, "invalid_value"),
    "seed negative": (completion(seed=-1), 400, "invalid_value"),
    "seed 2^63": (completion(seed=2**63), 400, "invalid_value"),
    # stream_options
    "stream_options without stream": (completion(stream_options={"include_usage": True}), 400, "invalid_value"),
    "stream_options include_usage not bool": (completion(stream=True, stream_options={"include_usage": 1}), 400,
                                              "invalid_value"),
    "stream_options unknown field": (completion(stream=True, stream_options={"x": True}), 400,
                                     "unknown_parameter"),
    # diffusion extensions
    "steps zero": (completion(steps=0), 400, "invalid_value"),
    "steps over max_tokens": (completion(steps=3), 400, "invalid_value"),
    "block_length zero": (completion(block_length=0), 400, "invalid_value"),
    "block_length over max_tokens": (completion(block_length=3), 400, "invalid_value"),
    "remasking unknown": (completion(remasking="margin"), 400, "invalid_value"),
    "threshold zero": (completion(threshold=0), 400, "invalid_value"),
    "threshold over 1": (completion(threshold=1.5), 400, "invalid_value"),
    "editing_threshold over 1": (completion(editing_threshold=1.5), 400, "invalid_value"),
    "max_post_steps negative": (completion(max_post_steps=-1), 400, "invalid_value"),
    # unknown fields, fields we cannot honour
    "unknown field": (completion(frobnicate=1), 400, "unknown_parameter"),
    "logprobs set": (completion(logprobs=2), 400, "unsupported_value"),
    "presence_penalty set": (completion(presence_penalty=0.5), 400, "unsupported_value"),
    "logit_bias set": (completion(logit_bias={"5": 1}), 400, "unsupported_value"),
    "echo set": (completion(echo=True), 400, "unsupported_value"),
    "tools set": (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_value"),
    "chat logprobs set": (chat(logprobs=True), 400, "unsupported_value"),
    # malformed bodies
    "malformed JSON": (("/v1/completions", b'{"model": "tiny", "prompt": '), 400, "invalid_json"),
    "JSON not an object": (("/v1/completions", b"[1, 2]"), 400, "invalid_value"),
}

ACCEPTED = {
    "temperature 0": completion(temperature=0),
    "temperature 2": completion(temperature=2, seed=1),
    "top_p 1": completion(top_p=1),
    "n 8": completion(n=8, max_tokens=1),
    "stop four strings": completion(stop=["a", "b", "c", "x" * 64]),
    "seed 2^63-1": completion(seed=2**63 - 1, temperature=1),
    "prompt list": completion(prompt=["Hello", "World"]),
    "steps and block_length at max_tokens": completion(steps=2, block_length=2, remasking="random"),
    "threshold 1": completion(threshold=1.0),
    # below the smallest float32, where the sampler compares: still threshold decoding, never 0 (no commit)
    "threshold under float32": completion(threshold=1e-300, max_tokens=2),
    "neutral OpenAI defaults": completion(logprobs=None, echo=False, presence_penalty=0, frequency_penalty=0.0,
                                          logit_bias={}, best_of=1, suffix=None, user="someone"),
    "chat neutral OpenAI defaults": chat(tools=[], tool_choice="none", logprobs=False, top_logprobs=0,
                                         response_format={"type": "text"}, parallel_tool_calls=True, store=False,
                                         user="someone"),
    "chat text parts": chat(messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
    "chat max_completion_tokens": chat(max_tokens=None, max_completion_tokens=2),
    "stream with usage": completion(stream=True, stream_options={"include_usage": True}),
}


def _send(api, target):
    path, body = target
    if isinstance(body, bytes):
        return api.post(path, body=body, headers={"Content-Type": "application/json"})
    return api.post(path, json={k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize("name", list(REFUSED))
async def test_refused_before_the_engine(api, name):
    target, status, code = REFUSED[name]
    resp = await _send(api, target)
    assert resp.status == status, resp.body
    error = ErrorResponse.model_validate(resp.json()).error
    assert error.code == code
    assert len(error.message) < 400
    assert len(api.engine.router.recent_ids) == 0, "an invalid request reached the engine"


@pytest.mark.parametrize("name", list(ACCEPTED))
async def test_accepted_at_the_bounds(api, name):
    path, body = ACCEPTED[name]
    resp = await _send(api, (path, body))
    assert resp.status == 200, resp.body
    if body.get("stream"):
        assert resp.events()[-1] == "[DONE]"
    else:
        model = CompletionResponse if path == "/v1/completions" else ChatCompletionResponse
        # Generated to the end, not cancelled by the request timeout.
        assert {c.finish_reason for c in model.model_validate(resp.json()).choices} <= {"stop", "length"}


async def test_context_length_error_states_both_numbers(api, tiny_model):
    resp = await api.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 600})
    assert resp.status == 400
    message = resp.json()["error"]["message"]
    prompt_tokens = len(tiny_model.tokenizer.encode("Hello", add_special_tokens=True))
    assert f"maximum context length is {MAX_MODEL_LEN}" in message
    assert f"requested {prompt_tokens + 600} tokens" in message


async def test_errors_never_echo_long_input(api):
    secret = "Q" * 5000
    bodies = [
        {"model": secret, "prompt": "x"},
        {"model": MODEL, "prompt": "x", secret: 1},
        {"model": MODEL, "prompt": "x", "remasking": secret},
        {"model": MODEL, "prompt": "x", "temperature": secret},
        {"model": MODEL, "messages": [{"role": secret, "content": "x"}]},
    ]
    for body in bodies:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        resp = await api.post(path, json=body)
        assert resp.status in (400, 404)
        assert "Q" * 201 not in resp.body.decode()
        assert "Traceback" not in resp.body.decode()
    resp = await api.post("/v1/completions", body=b'{"model": "' + secret.encode() + b'"',
                          headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "Q" * 201 not in resp.body.decode()
