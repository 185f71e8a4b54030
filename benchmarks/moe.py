"""MoE layer benchmark: one LLaDA2 sparse MLP (router, routed experts, shared
expert) with the experts run as grouped GEMMs (`dfastllm.models.moe`, one
`torch._grouped_mm` per projection) against the published per-expert loop
(`per_expert_reference`, what `moe_infer` does), side by side in one run.

    python benchmarks/moe.py                       # LLaDA2.0-mini shape, 32 and 1024 tokens, CPU fp32
    python benchmarks/moe.py --tokens 32 1024 4096 --dtype bf16 --device cuda

The LLaDA2.0-mini shape: hidden 2048, 256 experts of width 512, 8 per token
(8 groups, 4 kept), one shared expert, routed scaling 2.5. Weights are
random (N(0, 1/fan_in)) and the expert bias random, so routing spreads
tokens over the experts as a trained router roughly does. Prints the median
seconds per layer call of each path, their ratio, and the number of experts
that got a token. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dfastllm.models.moe import MoE, RouterConfig, per_expert_reference

MINI = dict(d_model=2048, expert_hidden=512, n_shared=1,
            router=RouterConfig(num_experts=256, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5))


def build_layer(dtype: torch.dtype, device: str, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(MINI["d_model"], MINI["expert_hidden"], MINI["n_shared"], MINI["router"]).to(device)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        layer.router.expert_bias.copy_(0.05 * torch.randn_like(layer.router.expert_bias))
    return layer.to(dtype)


def per_expert_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    experts, weights = layer.router(x)
    w_gate, w_up = layer.w_gate_up.chunk(2, dim=1)
    y = per_expert_reference(x, experts, weights, w_gate, w_up, layer.w_down)
    return y + layer.shared(x)


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 1024])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    layer = build_layer(dtype, args.device)
    results = []
    print(f"MoE layer, LLaDA2.0-mini shape (hidden 2048, 256 experts x 512, top-8, 1 shared), "
          f"{args.device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} {'experts hit':>11} {'grouped ms':>11} {'per-expert ms':>14} {'speed-up':>9}")
    with torch.inference_mode():
        for n in args.tokens:
            x = torch.randn(n, MINI["d_model"], device=args.device).to(dtype)
            experts, _ = layer.router(x)
            torch.testing.assert_close(layer(x), per_expert_forward(layer, x), atol=2e-2, rtol=2e-2)
            grouped = median_seconds(lambda: layer(x), args.device, args.repeats)
            loop = median_seconds(lambda: per_expert_forward(layer, x), args.device, args.repeats)
            hit = int(experts.unique().numel())
            print(f"{n:>7} {hit:>11} {grouped * 1e3:>11.2f} {loop * 1e3:>14.2f} {loop / grouped:>8.2f}x")
            results.append(dict(tokens=n, experts_hit=hit, grouped_s=grouped, per_expert_s=loop,
                                speedup=loop / grouped))
    if args.json:
        print(json.dumps(dict(device=args.device, dtype=args.dtype, torch=torch.__version__, results=results)))


if __name__ == "__main__":
    main()
