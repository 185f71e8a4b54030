"""Load generator for a running `dfastllm serve`: streaming completions at
given concurrencies (TTFT, inter-token latency, end-to-end latency
p50/p90/p99, request and token throughput, errors), plus the request rate of
a cheap endpoint (GET /v1/models) that shows the HTTP layer's own ceiling.

    dfastllm serve --model DIR --served-model-name tiny --workers 2 &
    python benchmarks/serving.py --url http://127.0.0.1:8000 --concurrency 1 8 32 --json

Each concurrency level runs `--requests` requests (at least 4 per client)
from that many concurrent clients that each send the next request as soon as
the last one ended. Token counts come from the stream's usage chunk
(stream_options.include_usage), so a chunk of several tokens (a diffusion
block) counts for all of them. `--json` prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered)}


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed completion: TTFT, the gaps between content chunks, the end-to-end time and the tokens."""
    started = time.perf_counter()
    first = None
    last = None
    gaps = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return {"error": f"HTTP {resp.status_code}: {resp.text[:200]}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"]["message"]}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event["choices"]):
                now = time.perf_counter()
                if first is None:
                    first = now - started
                else:
                    gaps.append(now - last)
                last = now
    end = time.perf_counter() - started
    return {"ttft": first, "gaps": gaps, "e2e": end, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if first is not None and tokens > 1 else None}


async def run_level(url: str, headers: dict, body: dict, concurrency: int, total: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[dict] = []
    queue = iter(range(total))

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as client:
        async def worker():
            for _ in queue:
                try:
                    results.append(await one_request(client, body))
                except httpx.HTTPError as error:
                    results.append({"error": f"{type(error).__name__}: {error}"})

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started

    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r["error"] for r in results if "error" in r})[:3],
        "seconds": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "inter_chunk_s": percentiles([g for r in ok for g in r["gaps"]]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
    }


async def models_rate(url: str, headers: dict, concurrency: int, seconds: float) -> dict:
    """GET /v1/models as fast as `concurrency` keep-alive clients can."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    count = errors = 0
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + seconds

        async def worker():
            nonlocal count, errors
            while time.perf_counter() < deadline:
                resp = await client.get("/v1/models")
                count += 1
                errors += resp.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": count, "errors": errors, "requests_per_s": count / elapsed}


def print_table(report: dict) -> None:
    m = report["models"]
    if m:
        print(f"GET /v1/models: {m['requests_per_s']:.0f} req/s ({m['concurrency']} clients, {m['errors']} errors)")
    print(f"{'conc':>4} {'req/s':>7} {'tok/s':>8} {'ttft p50/p90/p99 (ms)':>24} {'tpot p50/p99 (ms)':>18} "
          f"{'e2e p50/p90/p99 (s)':>22} {'errors':>6}")
    for level in report["levels"]:
        t, p, e = level["ttft_s"], level["tpot_s"], level["e2e_s"]

        def ms(x):
            return "-" if x is None else f"{1000 * x:.0f}"

        def s(x):
            return "-" if x is None else f"{x:.2f}"

        print(f"{level['concurrency']:>4} {level['requests_per_s']:>7.2f} {level['output_tokens_per_s']:>8.1f} "
              f"{ms(t['p50']) + '/' + ms(t['p90']) + '/' + ms(t['p99']):>24} "
              f"{ms(p['p50']) + '/' + ms(p['p99']):>18} {s(e['p50']) + '/' + s(e['p90']) + '/' + s(e['p99']):>22} "
              f"{level['errors']:>6}")


async def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id (default: the server's first model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 x concurrency, "
                                                                   "at least 16)")
    parser.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--models-seconds", type=float, default=5.0, help="0: skip the GET /v1/models rate")
    parser.add_argument("--models-concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
    body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    for name in ("block_length", "steps", "threshold"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)

    report = {"url": args.url, "model": model, "request": {k: v for k, v in body.items() if k != "prompt"},
              "models": None, "levels": []}
    if args.models_seconds > 0:
        report["models"] = await models_rate(args.url, headers, args.models_concurrency, args.models_seconds)
    for concurrency in args.concurrency:
        total = args.requests or max(16, 4 * concurrency)
        report["levels"].append(await run_level(args.url, headers, body, concurrency, total))
        print(f"concurrency {concurrency}: done", file=sys.stderr)
    print_table(report)
    if args.json:
        print(json.dumps(report))
    return 0 if all(level["errors"] == 0 for level in report["levels"]) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
