"""POST /v1/completions."""

from __future__ import annotations

import time

import orjson

from server.generation import Generation
from server.middleware.channel import channel_of, read_body
from server.schemas import CompletionRequest
from server.streaming import stream_events


class Completions:
    def __init__(self, state):
        self.state = state

    async def on_post(self, req, resp) -> None:
        request = CompletionRequest.from_body(await read_body(req), self.state.limits())
        req.context.user = request.user  # for the audit log
        prompts = [self.state.tokenizer.encode(p, add_special_tokens=True) for p in request.prompt]
        generation = Generation.build(self.state, req.context.request_id, request, prompts,
                                      channel=channel_of(req), started=req.context.started)
        await generation.start(span_name="POST /v1/completions", traceparent=req.get_header("traceparent"))
        req.context.admitted = True
        head = {"id": f"cmpl-{req.context.request_id}", "object": "text_completion", "created": int(time.time()),
                "model": self.state.model.name}
        if request.stream:
            stream_events(resp, _chunks(generation, head, request.include_usage))
            return
        choices = await generation.collect()
        resp.data = orjson.dumps({
            **head,
            "choices": [{"index": c.index, "text": "".join(c.pieces), "logprobs": None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": usage(generation),
        })


async def _chunks(generation: Generation, head: dict, include_usage: bool):
    extra = {"usage": None} if include_usage else {}
    async for delta in generation.deltas():
        yield {**head, "choices": [{"index": delta.index, "text": delta.text, "logprobs": None,
                                    "finish_reason": delta.finish_reason}], **extra}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(generation)}


def usage(generation: Generation) -> dict:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
