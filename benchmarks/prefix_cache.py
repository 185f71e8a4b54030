"""Prefix caching benchmark: time to first token of LLaDA2 requests that
share a long system prompt, with the prefix cache on and off, in one run.

    python benchmarks/prefix_cache.py                       # CPU, a small random LLaDA2 checkpoint
    python benchmarks/prefix_cache.py --system 2048 --requests 16 --device cuda --model DIR

Each request is the same system prompt followed by its own user turn
(different tokens), sent one after the other as a chat service sees them.
The first request computes the system prompt's blocks; with the cache on,
the later ones start on its pages and compute only their own blocks, with
it off they compute everything again. Time to first token is measured
from `add_request` to the first output that carries tokens (the engine
runs in this process; no HTTP). Prints the median and mean TTFT of the
requests after the first for both settings, their ratio, and the query
tokens of each request's first step. With --json the last line is one
JSON object. Answers are checked to be identical with the cache on and off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_llada2


def run(loaded, prompts: list[list[int]], params: SamplingParams, prefix_caching: bool, page_size: int | None):
    """-> (TTFT seconds per request, first-step query tokens per request, answers)."""
    core = EngineCore(loaded, kv_cache="dual", prefix_caching=prefix_caching, page_size=page_size)
    core.warmup(prompt_len=64, block_length=32)  # lazy initialisation is not what is measured
    ttft, first_tokens, answers = [], [], []
    for i, ids in enumerate(prompts):
        started = time.perf_counter()
        core.add_request(str(i), ids, params)
        first, answer, first_step = None, [], None
        while core.has_unfinished():
            outputs = core.step()
            if first_step is None:
                first_step = core.stats.last_step_query_tokens
            for o in outputs:
                if o.new_token_ids and first is None:
                    first = time.perf_counter() - started
                answer += o.new_token_ids
        ttft.append(first)
        first_tokens.append(first_step)
        answers.append(answer)
    return ttft, first_tokens, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a LLaDA2 checkpoint directory (default: a random one, written here)")
    parser.add_argument("--system", type=int, default=1024, help="system prompt tokens")
    parser.add_argument("--user", type=int, default=24, help="tokens of each request's own turn")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    directory = args.model
    if directory is None:
        directory = write_tiny_llada2(tempfile.mkdtemp(prefix="llada2-bench-"), seed=0, n_layers=4, d_model=256,
                                      n_heads=8, n_kv_heads=4, head_dim=32, intermediate_size=512,
                                      num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                      moe_intermediate_size=128, vocab=320, max_position_embeddings=8192,
                                      head_scale=12.0)
    loaded = load_model(directory, device=args.device)
    vocab, mask = loaded.config.vocab_size, loaded.mask_token_id
    gen = torch.Generator().manual_seed(0)

    def tokens(n):
        ids = torch.randint(10, vocab, (n,), generator=gen).tolist()
        return [t if t != mask else t + 1 for t in ids]

    system = tokens(args.system)
    prompts = [system + tokens(args.user) for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length, threshold=0.9,
                            ignore_eos=True)
    results = {}
    for on in (False, True):
        ttft, first_tokens, answers = run(loaded, prompts, params, on, args.page_size)
        later = ttft[1:]
        results["on" if on else "off"] = dict(median_s=statistics.median(later), mean_s=statistics.fmean(later),
                                              first_s=ttft[0], first_step_query_tokens=first_tokens,
                                              answers=answers)
    assert results["on"]["answers"] == results["off"]["answers"], "the prefix cache changed an answer"
    ratio = results["off"]["median_s"] / results["on"]["median_s"]
    print(f"{args.requests} requests of {args.system} + {args.user} prompt tokens, {args.max_tokens} answer "
          f"tokens in blocks of {args.block_length}, {args.device}")
    for name in ("off", "on"):
        r = results[name]
        print(f"prefix cache {name:3}: TTFT median {r['median_s'] * 1e3:8.1f} ms, mean {r['mean_s'] * 1e3:8.1f} ms "
              f"(first request {r['first_s'] * 1e3:.1f} ms); first-step query tokens {r['first_step_query_tokens']}")
    print(f"speed-up of the median TTFT: {ratio:.2f}x; answers identical")
    if args.json:
        summary = {name: {k: v for k, v in r.items() if k != "answers"} for name, r in results.items()}
        print(json.dumps(dict(summary, speedup=ratio, system=args.system, user=args.user, requests=args.requests)))


if __name__ == "__main__":
    main()
