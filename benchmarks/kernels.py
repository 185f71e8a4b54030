"""Kernel benchmark: dfastllm.ops.sample_tokens against its plain-torch
reference, on every available device.

    python benchmarks/kernels.py --quick            # N=256, V=126464, bf16, t in {0, 1}
    python benchmarks/kernels.py                    # N {32,256,1024} x V {32000,126464,152064}
    python benchmarks/kernels.py --n 256 --v 126464 --device cuda --json

Per case: median seconds of one call of the op (the Python wrapper's
checks and allocations, the launch and the kernel: what a caller waits) and
of the reference, the speed-up between the two, and the achieved bandwidth
of the logits read (N * V * 2 bytes). On CUDA it also measures the kernel's
own device time, replaying 20 calls captured in one CUDA graph (the host's
per-call work, ~25 us, is then out of the measure), and device-to-device copy
bandwidth (bytes read + written per second); the read bandwidth and its share
of the copy's come from the device time there. With --json the last line
is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dfastllm.ops import BUILT_WITH_CUDA, commit_tokens, sample_tokens, sample_tokens_reference

DEFAULT_N = [32, 256, 1024]
DEFAULT_V = [32000, 126464, 152064]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int, warmup: int = 1, setup=None) -> float:
    """Median wall time of fn(); setup() runs untimed before each call."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if setup:
            setup()
            _sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graph_seconds(fn, calls: int = 20, repeats: int = 20) -> float:
    """Device time of one fn() call on CUDA: `calls` calls captured in one
    CUDA graph and replayed, so the host's per-call work overlaps nothing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_seconds(graph.replay, "cuda", repeats) / calls


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy: (read + write) bytes per second, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=20, warmup=3)
    return 2 * nbytes / seconds / 1e9


def bench_case(device: str, n: int, v: int, t: float, *, repeats: int, ref_repeats: int) -> dict:
    gen = torch.Generator().manual_seed(n * 1000003 + v)
    logits = (torch.randn(n, v, generator=gen) * 3).to(torch.bfloat16).to(device)
    call = median_seconds(lambda: sample_tokens(logits, t, seed=1234), device, repeats)
    kernel = graph_seconds(lambda: sample_tokens(logits, t, seed=1234)) if device == "cuda" else call
    row = {"device": device, "n": n, "v": v, "t": t, "call_s": call, "kernel_s": kernel,
           "read_gbps": n * v * logits.element_size() / kernel / 1e9}
    if ref_repeats > 0:
        reference = median_seconds(lambda: sample_tokens_reference(logits, t, seed=1234), device, ref_repeats,
                                   warmup=1 if device == "cuda" else 0)
        row.update(reference_s=reference, speedup=reference / call)
    return row


def bench_commit(device: str, repeats: int) -> dict:
    """One engine-like commit step: 64 sequences x 32 candidates, top-2."""
    batch, block, length = 64, 32, 1024
    mask = 126336
    canvas = torch.full((batch, length), mask, dtype=torch.int64, device=device)
    offsets = (torch.arange(batch + 1, dtype=torch.int32) * block).to(device)
    positions = (torch.arange(block).repeat(batch) + length - block).to(device)
    tokens = torch.randint(0, 1000, (batch * block,), device=device)
    confidence = torch.rand(batch * block, device=device)
    k = torch.full((batch,), 2, dtype=torch.int32, device=device)
    threshold = torch.zeros(batch, device=device)

    def step():
        commit_tokens(canvas, offsets, positions, tokens, confidence, k, threshold, mask)

    return {"device": device, "op": "commit_tokens, 64 sequences x 32 candidates, top-2",
            "kernel_s": median_seconds(step, device, repeats, setup=lambda: canvas.fill_(mask))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=None, help=f"rows (default {DEFAULT_N})")
    parser.add_argument("--v", type=int, nargs="+", default=None, help=f"vocabulary (default {DEFAULT_V})")
    parser.add_argument("--t", type=float, nargs="+", default=[0.0, 1.0], help="temperatures")
    parser.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: all available)")
    parser.add_argument("--quick", action="store_true", help="only N=256, V=126464")
    parser.add_argument("--repeats", type=int, default=None, help="kernel timing repeats")
    parser.add_argument("--ref-repeats", type=int, default=None, help="reference timing repeats (0 = skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() and BUILT_WITH_CUDA else []))
    ns = args.n or ([256] if args.quick else DEFAULT_N)
    vs = args.v or ([126464] if args.quick else DEFAULT_V)
    results, copy_gbps, commits = [], {}, []
    for device in devices:
        repeats = args.repeats or (50 if device == "cuda" else 10)
        ref_repeats = args.ref_repeats if args.ref_repeats is not None else (10 if device == "cuda" else 3)
        if device == "cuda":
            copy_gbps[device] = copy_bandwidth_gbps(device)
        for n in ns:
            for v in vs:
                for t in args.t:
                    row = bench_case(device, n, v, t, repeats=repeats, ref_repeats=ref_repeats)
                    if device in copy_gbps:
                        row["share_of_copy_bw"] = row["read_gbps"] / copy_gbps[device]
                    results.append(row)
        commits.append(bench_commit(device, repeats))

    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, logits bf16")
    for device, gbps in copy_gbps.items():
        print(f"{device}: device-to-device copy {gbps:.0f} GB/s (read + write)")
    header = (f"{'device':6} {'N':>5} {'V':>7} {'t':>4} {'call ms':>9} {'ref ms':>9} {'speed-up':>9} "
              f"{'kernel ms':>10} {'GB/s':>8} {'%copy':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        ref = f"{r['reference_s'] * 1e3:9.2f}" if "reference_s" in r else f"{'-':>9}"
        speed = f"{r['speedup']:8.1f}x" if "speedup" in r else f"{'-':>9}"
        share = f"{r['share_of_copy_bw'] * 100:5.0f}%" if "share_of_copy_bw" in r else f"{'-':>6}"
        print(f"{r['device']:6} {r['n']:5d} {r['v']:7d} {r['t']:4.1f} {r['call_s'] * 1e3:9.3f} {ref} {speed} "
              f"{r['kernel_s'] * 1e3:10.3f} {r['read_gbps']:8.2f} {share}")
    for c in commits:
        print(f"{c['device']}: {c['op']}: {c['kernel_s'] * 1e6:.1f} us")
    if args.json:
        print(json.dumps({"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                          "copy_gbps": copy_gbps, "sample_tokens": results, "commit_tokens": commits}))


if __name__ == "__main__":
    main()
