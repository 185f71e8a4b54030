"""EngineCore: continuous batching of the denoising loop. No IO.

The engine process (rings) and the offline `LLM` drive it the same way:
`add_request` / `abort` between calls to `step`, which runs ONE denoising
step over the running batch and returns what became final.

One step:
  1. drop requests whose deadline passed, admit waiting requests (FIFO
     within the budgets: canvas rows, query tokens, KV pages) into free
     canvas rows and pages, and pick the rows that step (`scheduler.py`);
  2. ONE ragged forward over those rows' query tokens packed together
     (kv_cache none: whole canvases; dual/prefix: whole canvases at a block's
     first step, else only the part that changes, attending to the paged
     cache): each row costs its own tokens (`batch.py`). On CUDA a step with
     no full row is a replayed CUDA graph (`cuda_graphs.py`);
  3. the output head on the candidates' hidden rows only, one sampling and
     one commit kernel call, then one read of the candidates' cells; while
     the device runs them, the host prepares the next step's inputs (below);
  4. per request: advance its block, emit the newly final prefix, stop at
     EOS / end of turn / a stop id, or at max_tokens. A request that leaves
     gives its canvas row and pages back at once.

Host work off the critical path: once a step's kernels are queued, the
host builds the next step's inputs for the same rows, each as its schedule
says the step in flight will leave it (`Request.predict_next_step`), and
queues their upload behind this step's work. Only the read of the committed
cells waits for the device. If the next step turns out to be that one (no
row left, joined or sat out, each where its schedule said) it launches on
those inputs at once; else they are dropped and built again. Either way the
tokens are the same (tests/engine/test_prepare_ahead.py).

A failure inside the step (out of memory, a kernel error) fails the requests
of that step with finish_reason "error"; the engine keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import numpy as np
import torch

from dfastllm.engine import llada2_decoding
from dfastllm.engine.batch import StepBatch, build_step, query_extent
from dfastllm.engine.cuda_graphs import CachedStepGraphs, graphs_supported
from dfastllm.engine.kv_cache import CanvasRows, PagePool, bytes_per_page, kv_pool_pages
from dfastllm.engine.request import Request, RequestOutput
from dfastllm.engine.sampler import sample_and_commit
from dfastllm.engine.scheduler import Scheduler
from dfastllm.models.attention import FLASH_PAGE_MULTIPLE, RaggedAttention, flash_reads_pages, flash_usable
from dfastllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

KV_CACHE_MODES = ("auto", "none", "prefix", "dual")
# Tokens per KV page: small pages waste little of a request's last page;
# torch's flash kernel reads pages in place only at multiples of 256.
DEFAULT_PAGE_SIZE = 16


@dataclasses.dataclass
class EngineStats:
    """Counters the engine process publishes (monotonic, except last_*)."""
    steps: int = 0  # denoising steps run over the batch
    tokens_committed: int = 0  # canvas tokens committed, all requests
    rows_stepped: int = 0  # sum over steps of the batch size
    requests_finished: int = 0
    requests_failed: int = 0
    last_step_rows: int = 0
    last_step_full_rows: int = 0  # rows that ran over their whole canvas (the rest used the cache)
    last_step_query_tokens: int = 0  # tokens the step's forward computed (its rows' queries)
    last_step_tokens_committed: int = 0
    last_step_seconds: float = 0.0
    # Steps that launched on inputs prepared while the step before them ran.
    steps_prepared_ahead: int = 0
    # Host time of the steps spent while the device waits (before the launch
    # and after the read-back): what preparing ahead takes off it.
    critical_host_seconds: float = 0.0
    ahead_host_seconds: float = 0.0  # host time preparing next steps while the device ran
    # Prefix caching (LLaDA2): prompt tokens looked up in the cache, and found (whole pages).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def tokens_per_step(self) -> float:
        """Average tokens committed per request per step."""
        return self.tokens_committed / self.rows_stepped if self.rows_stepped else 0.0


class EngineCore:
    def __init__(self, loaded, *, kv_cache: str = "auto", max_batch_size: int = 32,
                 max_num_batched_tokens: int = 16384, kv_cache_memory: float = 0.9, page_size: int | None = None,
                 max_model_len: int | None = None, device: str | torch.device | None = None,
                 seed: int | None = None, cuda_graphs: bool = True, prefix_caching: bool = True,
                 prepare_ahead: bool = True):
        """`loaded` is a `dfastllm.models.LoadedModel` already on its device;
        kv_cache: "auto" is the family's default (dual for LLaDA2, none otherwise);
        max_num_batched_tokens: most query tokens one step computes;
        kv_cache_memory: the KV page pool (cached modes), in bytes (> 1) or as
        a fraction (<= 1) of the device memory free now (capped at what
        max_batch_size canvases of max_model_len could use); page_size: tokens
        per page (default 256 where the flash kernel reads pages, else 16);
        `seed` makes the seeds drawn for requests without one reproducible;
        `cuda_graphs`: replay cached steps' forwards as CUDA graphs (CUDA, dual/prefix);
        `prefix_caching`: requests share the cached pages of a common prompt
        prefix (LLaDA2 with its block cache, whose K/V is exact; kv_cache.py);
        `prepare_ahead`: build the next step's inputs while this one runs
        (off only to measure what it saves)."""
        if kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {kv_cache!r}")
        if kv_cache == "auto":  # the family's default: only LLaDA2's block cache is exact
            kv_cache = "dual" if loaded.family == "llada2" else "none"
        if max_batch_size < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_batch_size and max_num_batched_tokens must be >= 1")
        self.loaded = loaded
        self.model = loaded.model
        config = self.model.config
        weight = next(self.model.parameters())
        self.device = weight.device
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"the model is on {self.device}, not on the engine's device {device}")
        model_len = config.max_seq_len
        if max_model_len is not None and max_model_len > model_len:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's {model_len}")
        self.max_model_len = max_model_len or model_len
        self.kv_cache = kv_cache
        self.vocab_size = config.vocab_size
        self.mask_id = loaded.mask_token_id
        self.logits_shift = int(self.model.logits_shift)
        self.canvas = CanvasRows(rows=max_batch_size, columns=self.max_model_len, fill_id=loaded.pad_token_id,
                                 device=self.device)
        # LLaDA2 decodes by its own rules (llada2_decoding.py), with defaults from
        # the checkpoint's generation_config.json; its block-causal attention
        # always runs over the page pool (kv_cache none: recomputed every step).
        self.llada2_defaults = (llada2_decoding.LLaDA2Defaults.from_generation_config(loaded.generation_config)
                                if loaded.family == "llada2" else None)
        self.pool = None
        if kv_cache != "none" or self.llada2_defaults is not None:
            flash = flash_usable(weight.dtype, self.device, config.head_dim, config.n_kv_heads != config.n_heads)
            page_size = page_size or (FLASH_PAGE_MULTIPLE if flash and flash_reads_pages(FLASH_PAGE_MULTIPLE)
                                      else DEFAULT_PAGE_SIZE)
            shape = dict(n_layers=config.n_layers, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                         dtype=weight.dtype)
            most_pages = max_batch_size * -(-self.max_model_len // page_size)
            num_pages = kv_pool_pages(kv_cache_memory, bytes_per_page(**shape, page_size=page_size), self.device,
                                      most_pages)
            self.pool = PagePool(**shape, device=self.device, page_size=page_size, num_pages=num_pages)
        self.prefix_caching = prefix_caching and self.llada2_defaults is not None and kv_cache != "none"
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_num_batched_tokens=max_num_batched_tokens,
                                   canvas=self.canvas, pool=self.pool, query_tokens=self._query_tokens,
                                   prefix_caching=self.prefix_caching)
        self.graphs = (CachedStepGraphs(self.model, self.pool.cache,
                                        max_pages=-(-self.max_model_len // self.pool.page_size),
                                        max_seqlen_k=self.max_model_len)
                       if cuda_graphs and kv_cache != "none" and graphs_supported(weight.dtype, self.device,
                                                                                      config, self.pool.page_size)
                       else None)
        self.prepare_ahead = prepare_ahead
        self._prepared: _PreparedStep | None = None
        self.stats = EngineStats()
        self._queue_times: list[float] = []
        self._seeds = random.Random(seed)
        self._eos_ids = frozenset(i for i in (loaded.eos_token_id, loaded.eot_token_id) if i is not None)

    # ---- the public surface --------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.live)

    @property
    def kv_pages_used(self) -> int:
        """KV pages held by running requests (0 with kv_cache none)."""
        return self.pool.num_used if self.pool is not None else 0

    @property
    def kv_pages_free(self) -> int:
        return self.pool.num_free if self.pool is not None else 0

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    deadline: float | None = None) -> None:
        """Queue a request. deadline: time.monotonic() after which it is dropped
        (finish_reason "abort"). ValueError names what is wrong with the input."""
        if request_id in self.scheduler.live:
            raise ValueError(f"request id {request_id!r} is already running or waiting")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        params.validate()
        conflict = params.family_conflict(self.loaded.family)
        if conflict is not None:
            raise ValueError(conflict[1])
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos_ids)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        common = dict(seed=seed, mask_id=self.mask_id, stop_ids=stop_ids, deadline=deadline, arrival=time.monotonic(),
                      family=self.loaded.family)
        if self.llada2_defaults is None:
            request = Request(request_id, prompt_ids, params, **common)
        else:
            request = llada2_decoding.LLaDA2Request(request_id, prompt_ids, params, defaults=self.llada2_defaults,
                                                    **common)
        # The canvas: prompt + max_tokens (LLaDA2: rounded up to whole blocks).
        total = request.canvas_len
        size = f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens})"
        if total != len(prompt_ids) + params.max_tokens:
            size += f" in whole blocks of {request.attention_block}"
        if total > self.max_model_len:
            raise ValueError(f"{size} = {total} exceeds max_model_len {self.max_model_len}")
        if total > self.scheduler.max_num_batched_tokens:
            raise ValueError(f"{size} = {total} exceeds max_num_batched_tokens "
                             f"{self.scheduler.max_num_batched_tokens}, so its full steps could never run")
        if self.pool is not None and self.pool.pages_for(total) > self.pool.capacity:
            raise ValueError(f"{size} = {total} needs {self.pool.pages_for(total)} KV pages; the pool "
                             f"holds {self.pool.capacity} (raise kv_cache_memory), so it could never run")
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request at once (its row is free for the
        next step); no output follows. False if the id is not live."""
        request = self.scheduler.live.get(request_id)
        if request is None:
            return False
        self.scheduler.remove(request)
        return True

    def step(self) -> list[RequestOutput]:
        """One denoising step over the running batch; -> outputs of the requests
        that got new tokens or finished (deadline expiries included)."""
        started = time.perf_counter()
        outputs = self._expire(time.monotonic())
        outputs += self._schedule()
        running = self.scheduler.select()
        if not running:
            return outputs
        now = time.monotonic()
        for r in running:
            if r.first_step_at is None:
                r.first_step_at = now
                self._queue_times.append(now - r.arrival)
        prepared, self._prepared = self._prepared, None
        try:
            with torch.inference_mode():
                graphed = self.graphs is not None and not any(r.needs_full_forward for r in running)
                if prepared is not None and prepared.fits(running, self._query_extent):
                    batch = prepared.batch
                    self.stats.steps_prepared_ahead += 1
                else:
                    batch = self._build(running, graphed)
                launched = time.perf_counter()
                if graphed:
                    hidden = self.graphs.forward(batch)
                else:
                    cache = self.pool.cache if self.pool is not None else None
                    hidden = self.model.forward_packed(batch.input_ids, batch.position_ids,
                                                       RaggedAttention(batch.attn, cache))
                if self.llada2_defaults is None:
                    cells = sample_and_commit(self.model.head, hidden, batch, self.canvas.canvas, self.mask_id)
                else:
                    extra = llada2_decoding.step_inputs(running, np.diff(batch.host_offsets),
                                                        self.canvas.canvas.shape[0], self.device)
                    cells = llada2_decoding.sample_and_commit(self.model.head, hidden, batch, self.canvas.canvas,
                                                              self.mask_id, extra)
                reading = _start_read(cells)  # queued before the next step's inputs, so they don't delay it
                queued = time.perf_counter()
                if self.prepare_ahead:
                    self._prepared = self._prepare_next(running)
                waited = time.perf_counter()
                cells = reading()  # the step's one synchronisation
                read = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - any failure here is the step's, not the engine's
            self._prepared = None
            return outputs + self._fail(running, e)

        committed_total = 0
        offsets = batch.host_offsets
        for i, r in enumerate(running):
            lo, hi = offsets[i], offsets[i + 1]
            new_tokens, committed = r.apply_step(batch.host_positions[lo:hi], cells[lo:hi])
            committed_total += committed
            if self.prefix_caching:
                for page, key in r.final_pages(self.pool.page_size):
                    self.pool.register(page, key)
            if r.finish_reason is not None:
                self.scheduler.remove(r)
                self.stats.requests_finished += 1
            if new_tokens or r.finish_reason is not None:
                outputs.append(r.output(new_tokens))
        s = self.stats
        s.steps += 1
        s.rows_stepped += len(running)
        s.tokens_committed += committed_total
        s.last_step_rows = len(running)
        s.last_step_full_rows = batch.full_rows
        s.last_step_query_tokens = batch.query_tokens
        s.last_step_tokens_committed = committed_total
        s.last_step_seconds = time.perf_counter() - started
        # On a GPU the device runs from the launch until the read completes;
        # the host work it waits for is before the launch and after the read.
        s.critical_host_seconds += (launched - started) + (time.perf_counter() - read)
        s.ahead_host_seconds += waited - queued
        if self.prefix_caching:
            s.prefix_cache_queries = self.pool.prefix_queries * self.pool.page_size
            s.prefix_cache_hits = self.pool.prefix_hits * self.pool.page_size
        return outputs

    def drain_queue_times(self) -> list[float]:
        """Seconds from add_request to the first step of each request that
        started since the last call (for a queue-time histogram)."""
        times, self._queue_times = self._queue_times, []
        return times

    def warmup(self, *, prompt_len: int = 16, block_length: int = 32, batch_sizes=(1, 4)) -> None:
        """Run short generations of the common shapes (one block, full and
        cached steps, top-k and threshold, greedy and sampled) so the first
        real request does not pay for lazy initialisation (allocator,
        kernels, autotuning). Call it before serving; RuntimeError if a
        warm-up step fails (e.g. the batch does not fit in device memory)."""
        max_tokens = min(block_length, self.max_model_len - prompt_len)
        prompt = [(7 * i + 3) % self.vocab_size for i in range(prompt_len)]
        prompt = [t if t != self.mask_id else (t + 1) % self.vocab_size for t in prompt]
        stats = dataclasses.replace(self.stats)  # warm-up steps are not the service's
        for n in batch_sizes:
            n = min(n, self.scheduler.max_batch_size)
            logger.info("warm-up: %d request(s) of %d + %d tokens", n, prompt_len, max_tokens)
            for i in range(n):
                params = SamplingParams(max_tokens=max_tokens, steps=min(4, max_tokens), ignore_eos=True,
                                        threshold=0.9 if i % 2 else None, temperature=0.0 if i % 2 else 0.7)
                self.add_request(f"__warmup-{n}-{i}", prompt, params)
            while self.has_unfinished():
                failed = next((o for o in self.step() if o.finish_reason == "error"), None)
                if failed is not None:
                    for i in range(n):
                        self.abort(f"__warmup-{n}-{i}")
                    raise RuntimeError(f"warm-up failed: {failed.error}")
        self.stats = stats
        if self.pool is not None:  # nor are its prefix cache lookups
            self.pool.prefix_queries = self.pool.prefix_hits = 0
        self._queue_times.clear()

    # ---- internals ----------------------------------------------------------
    def _build(self, running: list[Request], graphed: bool):
        return build_step(running, self.canvas.canvas, cache_mode=self.kv_cache, logits_shift=self.logits_shift,
                          page_size=self.pool.page_size if self.pool is not None else 0,
                          pad_to=self.graphs.bucket(running, self._query_tokens) if graphed else None)

    def _prepare_next(self, running: list[Request]) -> _PreparedStep | None:
        """The next step's inputs if every row of this one steps again as its
        schedule says (queued behind this step's kernels, which commit the
        tokens they read); None when some row's next step is not known yet."""
        ahead = []
        for r in running:
            a = r.predict_next_step()
            if a is None:  # one unknown row: no prepared step (no copies of the rest)
                return None
            ahead.append(a)
        graphed = self.graphs is not None and not any(a.needs_full_forward for a in ahead)
        return _PreparedStep(running, ahead, self._build(ahead, graphed))

    def _expire(self, now: float) -> list[RequestOutput]:
        outputs = []
        for r in self.scheduler.expired(now):
            self.scheduler.remove(r)
            outputs.append(r.output([], "abort", error="deadline exceeded"))
        return outputs

    def _query_extent(self, r: Request) -> tuple[int, int]:
        return query_extent(r, self.kv_cache, self.logits_shift)

    def _query_tokens(self, r: Request) -> int:
        start, end = self._query_extent(r)
        return end - start

    def _schedule(self) -> list[RequestOutput]:
        """Admit waiting requests into free canvas rows (and pages);
        -> an error output for a request whose canvas could not be written."""
        try:
            self.scheduler.admit(lambda r: torch.tensor(r.prompt_ids + [self.mask_id] * (r.canvas_len - r.prompt_len),
                                                        dtype=torch.long).to(self.device))
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory
            return self._fail([self.scheduler.waiting[0]], e)
        return []

    def _fail(self, requests: list[Request], error: Exception) -> list[RequestOutput]:
        message = f"{type(error).__name__}: {error}"
        logger.error("denoising step failed for %d request(s): %s", len(requests), message)
        if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()
        outputs = []
        for r in requests:
            self.scheduler.remove(r)
            outputs.append(r.output([], "error", error=message))
        self.stats.requests_failed += len(requests)
        return outputs


def _start_read(cells: torch.Tensor):
    """Queue the copy of the committed cells to the host; -> a call that
    waits for that copy alone (not for work queued after it) -> numpy."""
    if cells.device.type != "cuda":
        return cells.numpy
    host = torch.empty(cells.shape, dtype=cells.dtype, pin_memory=True)
    host.copy_(cells, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> np.ndarray:
        copied.synchronize()
        return host.numpy()
    return wait


@dataclasses.dataclass
class _PreparedStep:
    """Inputs built for the next step while the current one ran."""
    requests: list[Request]  # the rows, as they were
    ahead: list[Request]  # each as its next step was predicted to find it
    batch: StepBatch

    def fits(self, running: list[Request], extent) -> bool:
        """The step about to run is the predicted one: the same rows, in the
        same canvas rows, each one step further in the predicted block, with
        the predicted count and querying the predicted positions (extent(r)
        -> [start, end))."""
        return len(running) == len(self.requests) and all(
            r is p and r.slot == a.slot and r.block == a.block and r.num_steps == a.num_steps
            and r.needs_full_forward == a.needs_full_forward and r.commit_count() == a.commit_count()
            and extent(r) == extent(a)
            for r, p, a in zip(running, self.requests, self.ahead))
