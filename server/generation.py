"""One generation request as the worker runs it: its engine requests (one
per prompt and choice), cancellation, and the merged stream of text deltas
that the completions and chat resources render.

How a request ends early:
- the client disconnects: the channel's watcher calls `cancel`, every engine
  request still running is cancelled, and each choice finishes "cancelled";
- `DELETE /v1/requests/{id}` from any worker: the engine finishes the first
  choice as cancelled, and this request cancels its siblings;
- the request timeout: the engine's own deadline (request_timeout_s from the
  SUBMIT), which finishes the request as cancelled like a DELETE;
- a stop string: that choice's stream is closed, which cancels it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import math
import time

from dfastllm import tracing
from dfastllm.engine.client import ErrorEvent, FinishedEvent, TokensEvent
from dfastllm.ipc.control import EngineState
from dfastllm.ipc.messages import choice_id
from dfastllm.sampling_params import OWN_BLOCK_DEFAULT_FAMILIES, SamplingParams
from server.errors import InternalError, InvalidRequest, ShuttingDown, Unavailable
from server.streaming import ChoiceText

log = logging.getLogger(__name__)

SEED_MODULUS = 2**63


@dataclasses.dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None = None  # set on the choice's last delta


class Choice:
    def __init__(self, index: int, engine_id: str, prompt_ids: list[int], params: SamplingParams, text: ChoiceText):
        self.index = index
        self.engine_id = engine_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.text = text
        self.stream = None  # the engine client's RequestStream once admitted
        self.pieces: list[str] = []  # the whole text, for non-streaming responses
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.error: ErrorEvent | None = None


class RequestSpan:
    """The worker's tracing span of one generation request (tracing on),
    a child of the client's W3C `traceparent`, from admission to the last
    delta. It is entered in a context of its own, so that whichever task
    finishes the request (a stream's finaliser included) can end it."""

    def __init__(self, name: str, traceparent: str | None, attributes: dict) -> None:
        self._context = contextvars.copy_context()
        self._span = tracing.request_span(name, traceparent=traceparent, attributes=attributes)
        self._context.run(self._span.__enter__)
        self.traceparent = self._context.run(tracing.current_traceparent)  # what the engine's spans hang under

    def end(self, error: BaseException | None = None) -> None:
        span, self._span = self._span, None
        if span is not None:
            self._context.run(span.__exit__, type(error) if error else None, error,
                              error.__traceback__ if error else None)


class Generation:
    def __init__(self, state, prompts: list[list[int]], choices: list[Choice], *, channel, started: float):
        self.state = state
        self.engine = state.engine
        self.metrics = state.metrics
        self.prompts = prompts
        self.choices = choices
        self.channel = channel
        self.started = started  # time.perf_counter() at arrival
        self.cancel_reason: str | None = None
        self._first_text_sent = False
        self._tasks: set[asyncio.Task] = set()
        self.span: RequestSpan | None = None

    @classmethod
    def build(cls, state, request_id: str, request, prompts: list[list[int]], *, channel, started: float):
        """One engine request per prompt and choice: distinct engine ids
        (`choice_id`, so that DELETE finds them all), seeds offset by the
        choice number."""
        n = request.n or 1
        choices = []
        refuse_mask_token(state.tokenizer, prompts, param=request.prompt_param)
        for p, prompt_ids in enumerate(prompts):
            params = sampling_params(state, request, len(prompt_ids))
            for i in range(n):
                index = p * n + i
                seeded = params if request.seed is None else dataclasses.replace(
                    params, seed=(request.seed + i) % SEED_MODULUS)
                choices.append(Choice(index, choice_id(request_id, index), prompt_ids, seeded,
                                      ChoiceText(state.tokenizer, request.stop)))
        return cls(state, prompts, choices, channel=channel, started=started)

    @property
    def prompt_tokens(self) -> int:
        """Each prompt counts once, whatever `n` (as OpenAI counts)."""
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    # ------------------------------------------------------------ lifecycle

    async def start(self, *, span_name: str = "generation", traceparent: str | None = None) -> None:
        """Submit every engine request. If the engine refuses one, those
        already admitted are cancelled and the refusal propagates (the error
        handler maps it: 409, 503, ...). With tracing on, the request's span
        (`span_name`, child of the client's `traceparent` header) starts here
        and its context travels in the SUBMITs."""
        if tracing.enabled():
            self.span = RequestSpan(span_name, traceparent, {"dfastllm.request_id": self.choices[0].engine_id,
                                                             "dfastllm.choices": len(self.choices)})
        try:
            await self._submit(self.span.traceparent if self.span else "")
        except BaseException as error:
            self._end_span(error)
            raise

    async def _submit(self, trace_context: str) -> None:
        results = await asyncio.gather(
            *(self.engine.submit(c.engine_id, c.prompt_ids, c.params, trace_context=trace_context)
              for c in self.choices), return_exceptions=True)
        refusals = [r for r in results if isinstance(r, BaseException)]
        if refusals:
            # Refused as a whole: the choices admitted meanwhile go, and free
            # their ids, so that a retry with the same X-Request-ID is not a duplicate.
            await asyncio.gather(*(r.aclose(withdraw=True) for r in results if not isinstance(r, BaseException)))
            raise refusals[0]
        for choice, stream in zip(self.choices, results):
            choice.stream = stream
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.channel.on_disconnect(lambda: self._cancel_soon("client_disconnect"))

    def _cancel_soon(self, reason: str) -> None:
        task = asyncio.ensure_future(self.cancel(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self, reason: str | None) -> None:
        """Cancel every choice still running; each then finishes "cancelled".
        `reason` is counted once per request; None when the engine cancelled
        a choice (a DELETE, counted by the worker that took it, or the
        deadline, counted by the engine)."""
        if self.cancel_reason is not None or self.finished:
            return
        self.cancel_reason = reason or "engine"
        if reason is not None:
            self.metrics.cancelled.labels(reason).inc()
            log.info("cancelling request", extra={"reason": reason})
        # A dead engine runs nothing, and its streams end with an error on their own.
        await asyncio.gather(*(self.engine.cancel(c.engine_id) for c in self.choices if c.finish_reason is None),
                             return_exceptions=True)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    # ------------------------------------------------------------ streaming

    async def deltas(self):
        """Text deltas of all choices as the engine commits tokens; each
        choice ends with one delta that carries its finish reason. An engine
        failure raises (503 if the engine died, else 500)."""
        try:
            source = self._choice_deltas(self.choices[0]) if len(self.choices) == 1 else self._merged()
            async for delta in source:
                yield delta
            self.metrics.e2e.observe(time.perf_counter() - self.started)
            failed = [c.error for c in self.choices if c.error is not None]
            if failed:
                if self.engine.state().state in (EngineState.DRAINING, EngineState.STOPPED):
                    # The drain timeout (or the engine's exit at the end of it) cut it short.
                    raise ShuttingDown("The server is shutting down and ended the generation before it "
                                       "finished; retry on another replica or once it is back.")
                if any(e.engine_failed for e in failed):
                    raise Unavailable("The engine failed while generating; retry shortly.")
                raise InternalError("The generation failed.")
        except Exception as error:
            self._end_span(error)
            raise
        finally:
            self._end_span(None)  # finished, or the client left (the stream was closed)

    def _end_span(self, error: BaseException | None) -> None:
        if self.span is not None:
            self.span.end(error)

    async def collect(self) -> list[Choice]:
        async for delta in self.deltas():
            self.choices[delta.index].pieces.append(delta.text)
        return self.choices

    async def _merged(self):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for delta in self._choice_deltas(choice):
                queue.put_nowait(delta)

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        for task in tasks:
            task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            for _ in tasks:
                while (delta := await queue.get()) is not None:
                    yield delta
            for task in tasks:
                task.result()  # a pump's exception, if any
        finally:
            for task in tasks:
                task.cancel()

    async def _choice_deltas(self, choice: Choice):
        last_tokens_at = None
        async for event in choice.stream:
            if isinstance(event, TokensEvent):
                now = time.perf_counter()
                if last_tokens_at is not None:
                    self.metrics.itl.observe((now - last_tokens_at) / len(event.ids))
                last_tokens_at = now
                text, stopped = choice.text.push(event.ids)
                if stopped:
                    await choice.stream.aclose()  # cancels the rest of this choice
                    yield self._finish(choice, text, "stop", choice.text.num_tokens)
                    return
                if text:
                    yield self._text(choice, text)
            elif isinstance(event, FinishedEvent):
                text, stopped = choice.text.flush()
                tokens = min(event.completion_tokens, choice.text.num_tokens) if stopped else event.completion_tokens
                delta = self._finish(choice, text, "stop" if stopped else event.reason, tokens)
                if event.reason == "cancelled":
                    await self.cancel(None)  # the siblings of a choice cancelled from outside
                yield delta
            else:
                choice.error = event
                log.error("generation failed", extra={"engine_id": choice.engine_id, "error": event.message,
                                                      "engine_failed": event.engine_failed})
                yield self._finish(choice, "", "error", choice.text.num_tokens)

    def _text(self, choice: Choice, text: str) -> Delta:
        if not self._first_text_sent:
            self._first_text_sent = True
            self.metrics.ttft.observe(time.perf_counter() - self.started)
        return Delta(choice.index, text)

    def _finish(self, choice: Choice, text: str, reason: str, completion_tokens: int) -> Delta:
        if text:
            self._text(choice, text)
        choice.finish_reason = reason
        choice.completion_tokens = completion_tokens
        self.metrics.generation_tokens.inc(completion_tokens)
        if reason in ("stop", "length"):
            self.metrics.success.labels(reason).inc()
        elif reason == "error":
            self.metrics.failure.labels("engine_failed" if choice.error.engine_failed else "request_failed").inc()
        return Delta(choice.index, text, reason)


def refuse_mask_token(tokenizer, prompts: list[list[int]], *, param: str) -> None:
    """The mask token marks the positions the model is to fill; in a prompt
    (typed as its special-token string) it would be denoised like a blank,
    not read as text."""
    mask = tokenizer.mask_token_id
    if mask is not None and any(mask in prompt for prompt in prompts):
        token = tokenizer.decode([mask], skip_special_tokens=False)
        raise InvalidRequest(f"the {param} contains the mask token {token!r}, which the model reserves for the "
                             "positions it generates", param=param)


def sampling_params(state, request, prompt_tokens: int) -> SamplingParams:
    """The request's decoding parameters with the server's defaults, after
    the context-length check (prompt + max_tokens <= max_model_len)."""
    config = state.config
    max_model_len = state.model.max_model_len
    room = max_model_len - prompt_tokens
    requested = request.requested_max_tokens
    # An omitted max_tokens is the default, clipped to what fits.
    max_tokens = requested if requested is not None else min(config.default_max_tokens, room)
    if not 1 <= max_tokens <= room:
        asked = requested or 1
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            param="max_tokens" if requested is not None else "prompt", code="context_length_exceeded")
    # Steps and block length a client gave were checked against the max_tokens it
    # asked for (or the default); they only shrink here when the default was clipped.
    steps = request.steps or math.ceil(max_tokens * config.default_steps_per_token)
    # An omitted block_length is the server's default, except for a family
    # with its own (Dream's whole canvas, LLaDA2's generation config).
    block_length = request.block_length
    if block_length is None and state.model.family not in OWN_BLOCK_DEFAULT_FAMILIES:
        block_length = config.default_block_length
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        top_k=request.top_k if request.top_k not in (None, -1, 0) else None,
        steps=min(steps, max_tokens),
        block_length=min(block_length, max_tokens) if block_length is not None else None,
        remasking=request.remasking or "low_confidence",
        threshold=request.threshold,
        seed=request.seed,
        ignore_eos=bool(request.ignore_eos),
        alg=request.alg,
        alg_temp=request.alg_temp,
        eps=request.eps,
        editing_threshold=request.editing_threshold,
        max_post_steps=request.max_post_steps,
    )
    conflict = params.family_conflict(state.model.family)
    if conflict is not None:
        raise InvalidRequest(conflict[1], param=conflict[0])
    return params
