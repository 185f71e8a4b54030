"""Token ids to client text, piece by piece, and the SSE framing.

`ChoiceText` turns the engine's committed token ids into text deltas:
incremental detokenization (never half a UTF-8 character) followed by the
client's stop strings, which may span any number of deltas. Only the tail
that could still be the beginning of a stop string is held back, so text
goes out as soon as it can no longer be part of one.
"""

from __future__ import annotations

import orjson

from server.errors import to_api_error

SSE_CONTENT_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(resp, events) -> None:
    """Send the payloads of `events` (an async iterator of dicts) as SSE.
    An error after the first byte can no longer change the status: it goes
    into the stream as an error event, and the stream still ends with [DONE]."""

    async def body():
        try:
            async for payload in events:
                yield sse_event(payload)
        except Exception as error:
            yield sse_event(to_api_error(error).body())
        yield SSE_DONE

    resp.content_type = SSE_CONTENT_TYPE
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")  # proxies must not hold chunks back
    resp.stream = body()


class StopStrings:
    """Finds the first stop string in a stream of text pieces."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""  # a tail that is a prefix of some stop string

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is safe to emit, whether a stop string was found). The
        stop string itself and everything after it are dropped."""
        buffer = self.pending + text
        found = [i for i in (buffer.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.pending = ""
            return buffer[:min(found)], True
        keep = self._partial_stop_length(buffer)
        self.pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that begins a stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class ChoiceText:
    """Detokenizer plus stop strings for one choice; counts the tokens the
    client got (everything up to the token that completed a stop string)."""

    def __init__(self, tokenizer, stops: list[str] | None):
        self.decoder = tokenizer.incremental_decoder()
        self.stops = StopStrings(stops) if stops else None
        self.num_tokens = 0

    def push(self, token_ids) -> tuple[str, bool]:
        if self.stops is None:
            self.num_tokens += len(token_ids)
            return self.decoder.push(token_ids), False
        # One token at a time, so that the count ends at the token that completed the stop string.
        pieces = []
        for token in token_ids:
            self.num_tokens += 1
            text, stopped = self.stops.push(self.decoder.push([token]))
            pieces.append(text)
            if stopped:
                return "".join(pieces), True
        return "".join(pieces), False

    def flush(self) -> tuple[str, bool]:
        """The held-back tail at the end of the generation (a stop string may
        still complete in the decoder's last characters)."""
        text = self.decoder.flush()
        if self.stops is None:
            return text, False
        text, stopped = self.stops.push(text)
        return (text if stopped else text + self.stops.flush()), stopped
