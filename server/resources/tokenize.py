"""POST /v1/tokenize and /v1/detokenize (vLLM-compatible helpers)."""

from __future__ import annotations

from server.middleware.channel import read_body
from server.schemas import DetokenizeRequest, TokenizeRequest


class Tokenize:
    def __init__(self, state):
        self.state = state

    async def on_post(self, req, resp) -> None:
        request = TokenizeRequest.from_body(await read_body(req), self.state.limits())
        tokenizer = self.state.tokenizer
        if request.messages is not None:
            text = tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in request.messages],
                                                 add_generation_prompt=request.add_generation_prompt is not False)
            # Same as chat completions: the template already holds the special tokens.
            tokens = tokenizer.encode(text, add_special_tokens=bool(request.add_special_tokens))
        else:
            # Same as completions unless the client says otherwise.
            tokens = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens is not False)
        resp.media = {"count": len(tokens), "max_model_len": self.state.model.max_model_len, "tokens": tokens}


class Detokenize:
    def __init__(self, state):
        self.state = state

    async def on_post(self, req, resp) -> None:
        request = DetokenizeRequest.from_body(await read_body(req), self.state.limits())
        resp.media = {"prompt": self.state.tokenizer.decode(request.tokens)}
