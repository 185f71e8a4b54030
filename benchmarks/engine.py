"""Throughput of the denoising loop (EngineCore in this process).

    python benchmarks/engine.py --shape tiny                 # random weights, CPU here
    python benchmarks/engine.py --shape llada-8b             # random 8B weights built on the GPU (bf16)
    python benchmarks/engine.py --model /path/to/checkpoint  # a real checkpoint directory
    ... --kv-cache none dual --batch-sizes 1 8 --prompt-len 64 --max-tokens 128 --json
    ... --cuda-graphs on off    # on a GPU: the cached modes with and without CUDA graphs
    ... --prepare-ahead off on  # host time per step on the critical path, without and with preparing ahead
    python benchmarks/engine.py --shape d256 --arrivals together staggered   # issue 15's comparison
    python benchmarks/engine.py --shape d256 --load mixed --kv-cache dual none # 32 mixed-length requests

For each kv_cache mode and batch size it runs one batch of identical-shape
requests (block 32, one token per step unless --steps, EOS ignored so every
request runs to max_tokens) and reports generated tokens/s and engine
steps/s. Per step it also separates full steps (a block's first, or every
step with kv_cache none) from cached block steps; the time of one cached
block step (forward + head + sampling + commit + the one read-back) is the
figure to hold against the time to read the weights once: every weight a
step reads whole (the blocks, the final norm and the head; the embedding is
only gathered), at the bandwidth of a device copy of them. A copy moves each
byte twice (read, then write), so the read takes half the copy's time.

`--arrivals together staggered` runs one set of requests (default 8, a
384-token prompt, 128 new tokens, block 32, one token per step) twice: all
added before the first step, then one added every --stagger-steps steps,
and prints the tokens/s of each and their ratio. `--load mixed` sends
--requests requests (default 32) with Poisson arrivals (exponential gaps of
--mean-gap-steps steps on average) and prompts drawn uniformly from
--min-prompt..--max-prompt tokens. Arrivals are counted in engine steps, not
seconds, so every engine sees the same schedule. Both report the share of
steps that carry a full-canvas row and, in the cached modes, the KV
memory held against the memory holding live tokens (each running
request's canvas), averaged over the steps where the batch is at least
half its largest size (steady state). Run them once with the tree's
engine and once with another on PYTHONPATH (`--label before`) to compare
two versions on the same machine.

`run_configuration` is the hook for other drivers: it runs one
configuration through any `generate(prompts, params)` callable whose
outputs have `.token_ids` and `.num_steps` (e.g. the engine process behind
its client); `engine_generate` is the in-process one used here.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import random
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.models import LoadedModel, load_model
from dfastllm.models.fp8 import quantize_fp8
from dfastllm.models.llada import LLaDAConfig, LLaDAModel

SHAPES = {
    # Small enough for a 2-core CPU; still has GQA-free multi-head attention and a real vocabulary size.
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=1024,
                 max_sequence_length=1024, mask_token_id=5, eos_token_id=1, pad_token_id=1),
    # The LLaDA-format d256, 4-layer model of issue 15's measurements.
    "d256": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, vocab_size=1024,
                 max_sequence_length=2048, mask_token_id=5, eos_token_id=1, pad_token_id=1),
    # GSAI-ML/LLaDA-8B-Instruct's config.json.
    "llada-8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                     vocab_size=126464, max_sequence_length=4096, rope_theta=500000.0,
                     mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
}

Generate = Callable[[list[list[int]], SamplingParams], list]


# ---- the hook: one configuration through any generate callable ---------------
def run_configuration(generate: Generate, *, batch_size: int, prompt_len: int, max_tokens: int,
                      block_length: int, steps: int | None, vocab_size: int, special_ids: set[int],
                      seed: int = 0) -> dict:
    """Run `batch_size` requests of `prompt_len` random tokens together;
    -> tokens, steps (the longest request's), seconds, tokens_per_s, steps_per_s."""
    gen = torch.Generator().manual_seed(seed)
    ordinary = torch.tensor([t for t in range(vocab_size) if t not in special_ids])
    prompts = [ordinary[torch.randint(len(ordinary), (prompt_len,), generator=gen)].tolist()
               for _ in range(batch_size)]
    params = SamplingParams(max_tokens=max_tokens, block_length=block_length, steps=steps, ignore_eos=True)
    started = time.perf_counter()
    outputs = generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for o in outputs)
    n_steps = max(o.num_steps for o in outputs)
    return dict(batch_size=batch_size, prompt_len=prompt_len, max_tokens=max_tokens, block_length=block_length,
                tokens=tokens, steps=n_steps, seconds=seconds, tokens_per_s=tokens / seconds,
                steps_per_s=n_steps / seconds)


# ---- in-process driver --------------------------------------------------------
def engine_generate(core: EngineCore, step_log: list) -> Generate:
    """A generate callable over EngineCore that logs (seconds, cached?) per step.
    Each step ends with the read-back of the committed tokens, a device
    synchronisation, so wall time per step is the device time too."""
    counter = iter(range(1 << 62))

    def generate(prompts, params):
        ids = [f"bench-{next(counter)}" for _ in prompts]
        for rid, p in zip(ids, prompts):
            core.add_request(rid, p, params)
        tokens = {rid: [] for rid in ids}
        done = {}
        while core.has_unfinished():
            started = time.perf_counter()
            outputs = core.step()
            step_log.append((time.perf_counter() - started, core.stats.last_step_full_rows == 0))
            for out in outputs:
                if out.finish_reason == "error":
                    raise RuntimeError(out.error)
                tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    done[out.request_id] = out.num_steps
        return [types.SimpleNamespace(token_ids=tokens[r], num_steps=done[r]) for r in ids]
    return generate


def synthetic_model(shape: str, device: torch.device, dtype: torch.dtype, n_layers: int | None = None
                    ) -> LoadedModel:
    """A LLaDA-format model with random weights, built directly on the device
    (n_layers: fewer layers of the shape, for a measure per layer)."""
    config = LLaDAConfig(**SHAPES[shape])
    if n_layers is not None:
        config = dataclasses.replace(config, n_layers=n_layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LLaDAModel(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed.weight":
                p.normal_(0.0, 0.5)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, config=config, tokenizer=None, family="llada",
                       mask_token_id=config.mask_token_id, eos_token_id=config.eos_token_id, eot_token_id=None,
                       pad_token_id=config.pad_token_id, path=f"<random {shape}>")


def weights_read_ms(model: torch.nn.Module, repeats: int = 5) -> tuple[float, float]:
    """-> (ms to read once every weight but the embedding, GB of them): half
    the best time to copy each into a scratch buffer of the largest one."""
    # As bytes: fp8 weights (buffers) and their scales count as they are stored.
    params = [t.detach().reshape(-1).view(torch.uint8) for name, t in model.state_dict().items()
              if not name.startswith("embed")]
    scratch = torch.empty(max(p.numel() for p in params), dtype=torch.uint8, device=params[0].device)
    best = float("inf")
    for _ in range(repeats):
        _sync(scratch.device)
        started = time.perf_counter()
        for p in params:
            scratch[:p.numel()].copy_(p)
        _sync(scratch.device)
        best = min(best, time.perf_counter() - started)
    return best * 1e3 / 2, sum(p.numel() for p in params) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- through the engine process (--through-process) ---------------------------
THROUGH_PROCESS_REPEATS = 3


def through_process(args) -> int:
    """The same configurations, but every request goes to a real engine
    process (started by the supervisor's functions, no HTTP) through an
    EngineClient, as an HTTP worker sends them: shared-memory rings, the
    engine loop, continuous batching. `--shape` writes a checkpoint of that
    shape with random weights, since the engine process loads from disk
    (with the test tokenizer's vocabulary: it cannot train a larger one)."""
    import asyncio
    import os
    import shutil
    import tempfile

    from dfastllm.config import ServerConfig
    from dfastllm.engine.client import EngineClient, FinishedEvent, TokensEvent
    from dfastllm.ipc import IpcLayout
    from dfastllm.supervisor import Supervisor
    from dfastllm.testing import write_tiny_llada

    if args.threads:  # the engine process reads it at torch start-up
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model_dir = args.model
    written = None
    if model_dir is None:
        shape = SHAPES[args.shape]
        model_dir = write_tiny_llada(tempfile.mkdtemp(prefix=f"dfastllm-bench-{args.shape}-"),
                                     d_model=shape["d_model"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                                     n_kv_heads=shape["n_kv_heads"], mlp_hidden_size=shape["mlp_hidden_size"],
                                     max_sequence_length=shape["max_sequence_length"])  # tokenizer's vocab (320)
        written = model_dir
    with open(os.path.join(model_dir, "config.json")) as f:
        checkpoint = json.load(f)
    # Random prompts avoid the ids with a role (mask, EOS, padding).
    special = {checkpoint[k] for k in ("mask_token_id", "eos_token_id", "pad_token_id")
               if checkpoint.get(k) is not None}
    vocab_size = checkpoint["vocab_size"]
    report = dict(model=args.model or args.shape, through="engine process", threads=args.threads, results=[])
    loop = asyncio.new_event_loop()
    counter = iter(range(1 << 62))

    async def one(client, prompt, params):
        stream = await client.submit(f"bench-{next(counter)}", prompt, params)
        tokens, steps = [], 0
        async for event in stream:
            if isinstance(event, TokensEvent):
                tokens += event.ids
            elif isinstance(event, FinishedEvent):
                steps = event.steps
            else:
                raise RuntimeError(event.message)
        return types.SimpleNamespace(token_ids=tokens, num_steps=steps)

    for kv_cache in args.kv_cache:
        config = ServerConfig(model=model_dir, device=args.device, dtype=args.dtype, kv_cache=kv_cache,
                              max_batch_size=max(args.batch_sizes), log_level="warning",
                              max_num_batched_tokens=max(args.batch_sizes) * (args.prompt_len + args.max_tokens))
        supervisor = Supervisor(config, http=False)
        supervisor.start()
        try:
            if not supervisor.wait_ready(300):
                raise RuntimeError("the engine process did not become ready")
            client = EngineClient(IpcLayout.attach(supervisor.layout.base_name))
            loop.run_until_complete(client.start())

            async def together(prompts, params):
                return await asyncio.gather(*(one(client, p, params) for p in prompts))

            def generate(prompts, params):
                return loop.run_until_complete(together(prompts, params))

            rows = []
            for batch_size in args.batch_sizes:
                # Best of a few runs: a run is short, and the machine may be shared.
                result = max((run_configuration(generate, batch_size=batch_size, prompt_len=args.prompt_len,
                                                max_tokens=args.max_tokens, block_length=args.block_length,
                                                steps=args.steps, vocab_size=vocab_size, special_ids=special,
                                                seed=repeat)
                              for repeat in range(THROUGH_PROCESS_REPEATS)), key=lambda r: r["tokens_per_s"])
                result.update(kv_cache=kv_cache, best_of=THROUGH_PROCESS_REPEATS)
                rows.append(result)
                print(f"through process: kv={kv_cache:<6} batch={batch_size:<3} {result['tokens_per_s']:9.1f} tok/s "
                      f"{result['steps_per_s']:8.1f} steps/s", file=sys.stderr)
            alone = next((r for r in rows if r["batch_size"] == 1), None)
            for r in rows:
                if alone is not None:
                    r["speedup_over_one_at_a_time"] = round(r["tokens_per_s"] / alone["tokens_per_s"], 2)
            report["results"] += rows
            loop.run_until_complete(client.close())
        finally:
            supervisor.stop()
    loop.close()
    if written is not None:
        shutil.rmtree(written, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
    return 0


def make_engine(loaded, *, kv_cache: str, max_batch_size: int, max_tokens_per_step: int, cuda_graphs: bool,
                prepare_ahead: bool = True) -> EngineCore:
    """An EngineCore with a step budget of max_tokens_per_step. An engine from
    before issue 15 (no paged pool) calls its budget max_num_tokens, and one
    before issue 16 always builds a step after the read; this lets the same
    script measure those versions side by side."""
    known = inspect.signature(EngineCore).parameters
    budget = "max_num_batched_tokens" if "max_num_batched_tokens" in known else "max_num_tokens"
    extra = {"prepare_ahead": prepare_ahead} if "prepare_ahead" in known else {}
    return EngineCore(loaded, kv_cache=kv_cache, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs,
                      **{budget: max_tokens_per_step}, **extra)


def batch_sizes(args, loaded, special, report) -> None:
    device = next(loaded.model.parameters()).device
    engines = [(kv, graphs == "on", ahead == "on") for kv in args.kv_cache
               for graphs in (args.cuda_graphs if kv != "none" and device.type == "cuda" else ["off"])
               for ahead in args.prepare_ahead]
    for kv_cache, cuda_graphs, prepare_ahead in engines:
        core = make_engine(loaded, kv_cache=kv_cache, max_batch_size=max(args.batch_sizes),
                           max_tokens_per_step=max(args.batch_sizes) * (args.prompt_len + args.max_tokens),
                           cuda_graphs=cuda_graphs, prepare_ahead=prepare_ahead)
        core.warmup(prompt_len=args.prompt_len, block_length=args.block_length,
                    batch_sizes=sorted(set(args.batch_sizes)))
        for batch_size in args.batch_sizes:
            step_log: list[tuple[float, bool]] = []
            before = dataclasses.replace(core.stats)
            result = run_configuration(engine_generate(core, step_log), batch_size=batch_size,
                                       prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                                       block_length=args.block_length, steps=args.steps,
                                       vocab_size=loaded.config.vocab_size, special_ids=special)
            full = [t for t, cached in step_log if not cached]
            cached = [t for t, cached in step_log if cached]
            result.update(kv_cache=kv_cache, cuda_graphs=core.graphs is not None,
                          full_step_ms=round(statistics.median(full) * 1e3, 3) if full else None,
                          block_step_ms=round(statistics.median(cached) * 1e3, 3) if cached else None)
            if hasattr(core.stats, "critical_host_seconds"):
                # Host time per step the device waits for (before the launch, after the read).
                steps = core.stats.steps - before.steps
                critical = core.stats.critical_host_seconds - before.critical_host_seconds
                prepared = core.stats.steps_prepared_ahead - before.steps_prepared_ahead
                result.update(prepare_ahead=prepare_ahead, critical_host_ms=round(critical / steps * 1e3, 3),
                              prepared_share=round(prepared / steps, 3))
            if "weights_read_ms" in report and result["block_step_ms"]:
                result["block_step_over_weights_read"] = round(result["block_step_ms"] / report["weights_read_ms"], 2)
            report["results"].append(result)
            print(f"kv={kv_cache:<6} graphs={'on' if core.graphs else 'off':<3} "
                  f"ahead={'on' if prepare_ahead else 'off':<3} batch={batch_size:<3} "
                  f"{result['tokens_per_s']:9.1f} tok/s "
                  f"{result['steps_per_s']:8.1f} steps/s  full step {result['full_step_ms']} ms  "
                  f"cached block step {result['block_step_ms']} ms  "
                  f"host on the critical path {result.get('critical_host_ms')} ms/step "
                  f"({result.get('prepared_share', 0):.0%} prepared ahead)", file=sys.stderr)


# ---- arrivals over time: together vs staggered, mixed lengths under load -------
def scenarios(args, loaded, special, report) -> None:
    gen = torch.Generator().manual_seed(0)
    ordinary = torch.tensor([t for t in range(loaded.config.vocab_size) if t not in special])
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length, steps=args.steps,
                            ignore_eos=True)
    runs = []  # (name, [(arrival step, prompt)])
    if args.arrivals:
        n = args.requests or 8
        prompts = [ordinary[torch.randint(len(ordinary), (args.prompt_len,), generator=gen)].tolist()
                   for _ in range(n)]
        for arrivals in args.arrivals:
            gap = args.stagger_steps if arrivals == "staggered" else 0
            runs.append((arrivals, [(i * gap, p) for i, p in enumerate(prompts)]))
    if args.load:
        n = args.requests or 32
        step, schedule = 0.0, []
        for _ in range(n):
            length = rng.randint(args.min_prompt, args.max_prompt)
            schedule.append((int(step), ordinary[torch.randint(len(ordinary), (length,), generator=gen)].tolist()))
            step += rng.expovariate(1.0 / args.mean_gap_steps)
        runs.append(("mixed", schedule))
    device = next(loaded.model.parameters()).device
    for kv_cache in args.kv_cache:
        cuda_graphs = args.cuda_graphs[-1] == "on" and device.type == "cuda"
        for name, schedule in runs:
            longest = max(len(p) for _, p in schedule) + args.max_tokens
            core = make_engine(loaded, kv_cache=kv_cache, max_batch_size=args.max_batch_size or len(schedule),
                               max_tokens_per_step=len(schedule) * longest, cuda_graphs=cuda_graphs)
            core.warmup(prompt_len=min(64, args.prompt_len), block_length=args.block_length, batch_sizes=(1, 4))
            result = run_schedule(core, schedule, params)
            result.update(label=args.label, scenario=name, kv_cache=kv_cache, requests=len(schedule))
            report["results"].append(result)
            kv = (f"  KV live/held {result['kv_live_share']:.0%} (held {result['kv_held_mb']:.1f} MB, "
                  f"reserved {result['kv_reserved_mb']:.1f} MB)" if result.get("kv_live_share") else "")
            print(f"{args.label or '':<7} {name:<9} kv={kv_cache:<6} {result['tokens_per_s']:8.1f} tok/s "
                  f"{result['step_ms']:7.1f} ms/step  {result['full_step_share']:.0%} steps with a full row{kv}",
                  file=sys.stderr)
        by_name = {r["scenario"]: r for r in report["results"] if r["kv_cache"] == kv_cache}
        if "together" in by_name and "staggered" in by_name:
            ratio = by_name["staggered"]["tokens_per_s"] / by_name["together"]["tokens_per_s"]
            by_name["staggered"]["over_together"] = round(ratio, 3)
            print(f"{args.label or '':<7} staggered / together, kv={kv_cache}: {ratio:.2f}x", file=sys.stderr)


def run_schedule(core: EngineCore, schedule, params: SamplingParams) -> dict:
    """Step `core` until every request of `schedule` [(arrival step, prompt)]
    has finished, adding each at its step; -> tokens/s and the step figures."""
    pending = sorted(schedule, key=lambda a: a[0])
    ids = iter(range(1 << 62))
    step, tokens, full_steps, step_seconds = 0, 0, 0, []
    kv_samples = []  # (running rows, live tokens, held tokens)
    started = time.perf_counter()
    while pending or core.has_unfinished():
        while pending and pending[0][0] <= step:
            core.add_request(f"bench-{next(ids)}", pending.pop(0)[1], params)
        if not core.has_unfinished():  # idle until the next arrival: skip ahead
            step = pending[0][0]
            continue
        t = time.perf_counter()
        outputs = core.step()
        step_seconds.append(time.perf_counter() - t)
        step += 1
        full_steps += core.stats.last_step_full_rows > 0
        for out in outputs:
            if out.finish_reason == "error":
                raise RuntimeError(out.error)
            tokens += len(out.new_token_ids)
        kv_samples.append((core.num_running, *kv_tokens(core)))
    seconds = time.perf_counter() - started
    result = dict(tokens=tokens, seconds=round(seconds, 3), tokens_per_s=tokens / seconds, steps=len(step_seconds),
                  step_ms=statistics.mean(step_seconds) * 1e3, full_step_share=full_steps / len(step_seconds))
    busiest = max(n for n, _, _ in kv_samples)
    steady = [(live, held) for n, live, held in kv_samples if n >= busiest / 2 and held]
    if steady:
        per_token = kv_bytes_per_token(core)
        result.update(kv_live_share=sum(live for live, _ in steady) / sum(held for _, held in steady),
                      kv_held_mb=max(held for _, held in steady) * per_token / 1e6,
                      kv_reserved_mb=kv_reserved_tokens(core) * per_token / 1e6)
    return result


def kv_tokens(core: EngineCore) -> tuple[int, int]:
    """-> (canvas tokens of the running requests, K/V token cells the engine holds for them)."""
    live = sum(r.canvas_len for r in core.scheduler.running)
    pool = getattr(core, "pool", None)
    if pool is not None:
        return live, pool.num_used * pool.page_size
    buffers = getattr(core, "buffers", None)  # the dense cache before issue 15: rows x (columns + 1)
    if buffers is not None and buffers.k:
        return live, buffers.k[0].shape[0] * buffers.k[0].shape[2]
    return live, 0


def kv_reserved_tokens(core: EngineCore) -> int:
    pool = getattr(core, "pool", None)
    if pool is not None:
        return pool.num_pages * pool.page_size
    return kv_tokens(core)[1]


def kv_bytes_per_token(core: EngineCore) -> int:
    c = core.model.config
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * next(core.model.parameters()).element_size()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--count-ops", action="store_true",
                        help="print the compute ops per layer per step (LLaDA and Dream, CPU) and exit")
    source.add_argument("--model", help="checkpoint directory or hub id")
    source.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape, built on the device")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--kv-cache", nargs="+", default=None, choices=("none", "prefix", "dual"),
                        help="default: none dual (--arrivals: dual)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=None, help="default 64 (--arrivals: 384)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="total steps (default: one token per step)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cuda-graphs", nargs="+", default=["on"], choices=("on", "off"),
                        help="cached modes on CUDA: with CUDA graphs, without, or both side by side")
    parser.add_argument("--prepare-ahead", nargs="+", default=["on"], choices=("on", "off"),
                        help="build the next step's inputs while the device runs this one (on off: both)")
    parser.add_argument("--arrivals", nargs="+", choices=("together", "staggered"),
                        help="requests added all at once, or one every --stagger-steps steps")
    parser.add_argument("--stagger-steps", type=int, default=5)
    parser.add_argument("--load", choices=("mixed",), help="Poisson arrivals of mixed-length prompts")
    parser.add_argument("--requests", type=int, default=None, help="requests of --arrivals (8) or --load (32)")
    parser.add_argument("--mean-gap-steps", type=float, default=2.0, help="--load: mean steps between arrivals")
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-batch-size", type=int, default=None, help="--arrivals/--load: default all requests")
    parser.add_argument("--label", default="", help="a tag printed with each --arrivals/--load figure")
    parser.add_argument("--quantization", choices=("fp8",), default=None, help="weights in fp8 (e4m3)")
    parser.add_argument("--baseline", action="store_true",
                        help="on a GPU: also time a plain-PyTorch cached block step (benchmarks/baseline_step.py)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--through-process", action="store_true",
                        help="send the requests to a real engine process through an EngineClient")
    args = parser.parse_args(argv)
    if args.count_ops:
        from op_count import report  # benchmarks/op_count.py, beside this file
        return 0 if report() else 1
    if args.model is None and args.shape is None:
        if not (args.arrivals or args.load):
            parser.error("one of --model, --shape or --count-ops is required")
        args.shape = "d256"  # issue 15's configuration
    args.prompt_len = args.prompt_len or (384 if args.arrivals else 64)
    args.kv_cache = args.kv_cache or (["dual"] if args.arrivals and not args.load else ["none", "dual"])
    if args.through_process:
        return through_process(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    started = time.perf_counter()
    loaded = (synthetic_model(args.shape, device, dtype) if args.shape
              else load_model(args.model, device=device, dtype=dtype, quantization=args.quantization))
    if args.quantization == "fp8" and args.shape:  # a checkpoint converts in load_model
        quantize_fp8(loaded.model)
    load_s = time.perf_counter() - started
    special = {loaded.mask_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.eot_token_id} - {None}
    report = dict(model=args.model or args.shape, device=str(device), dtype=str(dtype).removeprefix("torch."),
                  quantization=args.quantization,
                  threads=torch.get_num_threads(), load_s=round(load_s, 2),
                  params=sum(p.numel() for p in loaded.model.parameters()), results=[])
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        read_ms, read_gb = weights_read_ms(loaded.model)
        report.update(weights_read_ms=round(read_ms, 3), weights_read_gb=round(read_gb, 2))

    if args.baseline and device.type == "cuda":
        from baseline_step import baseline_step_ms  # benchmarks/baseline_step.py, beside this file
        report["baseline_step_ms"] = {
            b: round(baseline_step_ms(loaded.model, batch_size=b, context=args.prompt_len + args.max_tokens,
                                      block_length=args.block_length), 3) for b in args.batch_sizes}
        print(f"plain-PyTorch baseline cached block step (one CUDA graph): {report['baseline_step_ms']} ms",
              file=sys.stderr)

    if args.arrivals or args.load:
        scenarios(args, loaded, special, report)
    else:
        batch_sizes(args, loaded, special, report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
