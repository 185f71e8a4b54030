"""POST /v1/chat/completions: the model's chat template, then the same
generation as completions."""

from __future__ import annotations

import time

import orjson

from server.generation import Generation
from server.middleware.channel import channel_of, read_body
from server.resources.completions import usage
from server.schemas import ChatCompletionRequest
from server.streaming import stream_events


class ChatCompletions:
    def __init__(self, state):
        self.state = state

    async def on_post(self, req, resp) -> None:
        request = ChatCompletionRequest.from_body(await read_body(req), self.state.limits())
        req.context.user = request.user  # for the audit log
        tokenizer = self.state.tokenizer
        # The template writes the special tokens (BOS) itself.
        prompt = tokenizer.encode(tokenizer.apply_chat_template(request.message_dicts()), add_special_tokens=False)
        generation = Generation.build(self.state, req.context.request_id, request, [prompt],
                                      channel=channel_of(req), started=req.context.started)
        await generation.start(span_name="POST /v1/chat/completions", traceparent=req.get_header("traceparent"))
        req.context.admitted = True
        head = {"id": f"chatcmpl-{req.context.request_id}", "created": int(time.time()),
                "model": self.state.model.name}
        if request.stream:
            stream_events(resp, _chunks(generation, head, request.include_usage))
            return
        choices = await generation.collect()
        resp.data = orjson.dumps({
            **head, "object": "chat.completion",
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.pieces)},
                         "logprobs": None, "finish_reason": c.finish_reason} for c in choices],
            "usage": usage(generation),
        })


async def _chunks(generation: Generation, head: dict, include_usage: bool):
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}], **extra}

    for choice in generation.choices:
        yield chunk(choice.index, {"role": "assistant", "content": ""})
    async for delta in generation.deltas():
        if delta.text:
            yield chunk(delta.index, {"content": delta.text})
        if delta.finish_reason is not None:
            yield chunk(delta.index, {}, delta.finish_reason)
    if include_usage:
        yield {**head, "choices": [], "usage": usage(generation)}
