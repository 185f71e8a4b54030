"""The offline API: load a model and generate in this process.

    from dfastllm import LLM, SamplingParams
    llm = LLM()  # the embedded tiny model
    out = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
    print(out[0].text)

All prompts of a call go through one `EngineCore` together, so they are
batched continuously exactly as on the server.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence

import torch

from dfastllm.config import ServerConfig
from dfastllm.engine.build import DTYPES, build_engine_core
from dfastllm.models import LoadedModel
from dfastllm.sampling_params import SamplingParams


@dataclasses.dataclass
class GenerationOutput:
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated, the stop token excluded
    finish_reason: str  # "stop" | "length"
    num_steps: int  # denoising steps the request took


class LLM:
    def __init__(self, model: str | os.PathLike | LoadedModel | None = None, *, device: str = "auto",
                 dtype: str | torch.dtype | None = None, quantization: str = "none", kv_cache: str = "auto",
                 max_batch_size: int = 32,
                 max_num_batched_tokens: int = 16384, kv_cache_memory: float = 0.9,
                 max_model_len: int | None = None, seed: int | None = None, cuda_graphs: bool = True,
                 prefix_caching: bool = True):
        """model: checkpoint directory or hub id (None: the embedded tiny model),
        or a model already loaded with `load_model` (device and dtype then unused).
        device: "auto" (CUDA when available), "cpu", "cuda[:N]". dtype: None or
        "auto" (bf16 on CUDA, fp32 on CPU), a name or a torch dtype.
        quantization: "none" or "fp8" (the blocks' projections in e4m3; `dfastllm.models.fp8`).
        seed: makes the seeds of requests that give none reproducible.
        cuda_graphs: replay cached steps' forwards as CUDA graphs (CUDA, kv_cache dual/prefix).
        prefix_caching: LLaDA2 requests share the KV pages of a common prompt prefix.
        The engine is built as the server builds its own (`dfastllm.engine.build`)."""
        loaded = model if isinstance(model, LoadedModel) else None
        if isinstance(dtype, torch.dtype):
            names = {v: k for k, v in DTYPES.items()}
            if dtype not in names:
                raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype}")
            dtype = names[dtype]
        config = ServerConfig(model=None if loaded is not None or model is None else os.fspath(model),
                              device=device, dtype=dtype or "auto", quantization=quantization, kv_cache=kv_cache,
                              max_batch_size=max_batch_size, max_num_batched_tokens=max_num_batched_tokens,
                              kv_cache_memory=kv_cache_memory,
                              max_model_len=max_model_len, seed=seed, cuda_graphs=cuda_graphs,
                              prefix_caching=prefix_caching)
        self.engine = build_engine_core(config, loaded)
        self.loaded = self.engine.loaded
        self.tokenizer = self.loaded.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists (a
        flat list of ints is one prompt). params: one for all or one per prompt.
        -> one GenerationOutput per prompt, in order. RuntimeError if the engine
        fails a request."""
        texts, token_lists = self._normalize(prompts)
        return self._run(texts, token_lists, params)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them;
        each goes through the tokenizer's chat template with the generation prompt."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts = [self.tokenizer.apply_chat_template(list(c)) for c in conversations]
        # The template already holds the special tokens (BOS).
        return self._run(texts, [self.tokenizer.encode(t, add_special_tokens=False) for t in texts], params)

    def _normalize(self, prompts) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and all(isinstance(t, int) for t in prompts):
            prompts = [list(prompts)]
        texts, token_lists = [], []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                token_lists.append(self.tokenizer.encode(p, add_special_tokens=True))
            else:
                texts.append(None)
                token_lists.append([int(t) for t in p])
        return texts, token_lists

    def _run(self, texts, token_lists, params) -> list[GenerationOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"{len(params)} SamplingParams for {len(token_lists)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        try:
            for rid, tokens, p in zip(ids, token_lists, params):
                self.engine.add_request(rid, tokens, p)
            generated = {rid: [] for rid in ids}
            finished = {}
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    generated[out.request_id] += out.new_token_ids
                    if out.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {out.error}")
                    if out.finished:
                        finished[out.request_id] = out
        finally:  # an error (or KeyboardInterrupt) must not leave requests behind
            for rid in ids:
                self.engine.abort(rid)
        results = []
        for rid, text, tokens in zip(ids, texts, token_lists):
            out = finished[rid]
            results.append(GenerationOutput(
                prompt=text, prompt_token_ids=tokens, token_ids=generated[rid],
                text=self.tokenizer.decode(generated[rid], skip_special_tokens=True),
                finish_reason=out.finish_reason, num_steps=out.num_steps))
        return results
