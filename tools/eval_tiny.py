"""Held-out accuracy of the embedded tiny model, per task family.

Against a running server (OpenAI-compatible /v1/chat/completions):

    python tools/eval_tiny.py --base-url http://127.0.0.1:8000 [--threshold 0.9] [--kv-cache prefix] [--json]

or in process through the offline API (`dfastllm.LLM`), before or without a server:

    python tools/eval_tiny.py --offline [--model dfastllm/assets/tiny-llada] [--json]

Every question is asked at temperature 0 with the default diffusion settings
(steps = max_tokens, block length 32, low_confidence remasking) unless
--threshold turns on parallel decoding. The questions come from the held-out
side of tools/tiny_tasks.py, never seen in training. Reports accuracy per
family and the mean number of denoising steps per answer; with --json the last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_tasks  # noqa: E402
from dfastllm.checkpoints import DEFAULT_MODEL_DIR  # noqa: E402

# Where a server might report a request's denoising steps in `usage`.
USAGE_STEP_KEYS = ("denoising_steps", "num_steps", "steps")
STEPS_METRIC = "dfastllm:denoising_steps_total"


def ask_server(args, tasks):
    """(reply text, steps or None) per task, over HTTP."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=args.base_url, headers=headers, timeout=args.timeout)
    model = args.model or client.get("/v1/models").raise_for_status().json()["data"][0]["id"]

    def ask(task):
        body = {"model": model, "messages": [{"role": "user", "content": task.prompt}],
                "temperature": 0, "max_tokens": args.max_tokens}
        if args.threshold is not None:
            body["threshold"] = args.threshold
        reply = client.post("/v1/chat/completions", json=body).raise_for_status().json()
        usage = reply.get("usage") or {}
        steps = next((usage[k] for k in USAGE_STEP_KEYS if k in usage), None)
        return reply["choices"][0]["message"]["content"] or "", steps

    steps_before = _steps_metric(client)
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(ask, tasks))
    steps_after = _steps_metric(client)
    if all(s is None for _, s in results) and args.concurrency == 1 and None not in (steps_before, steps_after):
        # One request at a time: every engine step belonged to one answer.
        mean = (steps_after - steps_before) / len(tasks)
        results = [(text, mean) for text, _ in results]
    return results, model


def _steps_metric(client) -> float | None:
    response = client.get("/metrics")
    if response.status_code != 200:
        return None
    for line in response.text.splitlines():
        if line.startswith(STEPS_METRIC) and not line.startswith(STEPS_METRIC + "_"):
            return float(line.rsplit(" ", 1)[1])
    return None


def ask_offline(args, tasks):
    """(reply text, steps) per task, through dfastllm.LLM in this process."""
    from dfastllm import LLM, SamplingParams

    llm = LLM(model=args.model or DEFAULT_MODEL_DIR, quantization=args.quantization or "none")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, threshold=args.threshold)
    outputs = llm.chat([[{"role": "user", "content": t.prompt}] for t in tasks], params)
    return [(out.text, out.num_steps) for out in outputs], args.model or DEFAULT_MODEL_DIR


def report(tasks, results, args, model, seconds) -> dict:
    by_family: dict[str, list[bool]] = {}
    failures = []
    for task, (text, _) in zip(tasks, results):
        ok = tiny_tasks.check(task, text)
        by_family.setdefault(task.family, []).append(ok)
        if not ok:
            failures.append({"family": task.family, "prompt": task.prompt, "expected": task.answer, "got": text})
    steps = [s for _, s in results if s is not None]
    summary = {
        "model": model,
        "mode": "offline" if args.offline else "server",
        "kv_cache": args.kv_cache,
        "quantization": args.quantization,
        "threshold": args.threshold,
        "max_tokens": args.max_tokens,
        "questions": len(tasks),
        "accuracy": {f: round(sum(c) / len(c), 4) for f, c in by_family.items()},
        "overall": round(sum(map(sum, by_family.values())) / len(tasks), 4),
        "mean_steps": round(sum(steps) / len(steps), 2) if steps else None,
        "seconds": round(seconds, 1),
        "failures": failures[: args.show_failures],
    }
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running dfastllm server, e.g. http://127.0.0.1:8000")
    where.add_argument("--offline", action="store_true", help="run through dfastllm.LLM in this process")
    p.add_argument("--model", help="served model name (server; default: the first of /v1/models) "
                                    "or checkpoint directory (offline; default: the embedded tiny model)")
    p.add_argument("--per-family", type=int, default=100, help="held-out questions per family")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threshold", type=float, default=None, help="parallel decoding threshold (default: off)")
    p.add_argument("--quantization", choices=("fp8",), default=None, help="offline: weights in fp8 (e4m3)")
    p.add_argument("--kv-cache", default=None, help="the server's kv-cache mode, recorded in the report only")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (server mode)")
    p.add_argument("--api-key", default=os.environ.get("DFASTLLM_API_KEY"))
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--show-failures", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = tiny_tasks.held_out_set(args.per_family)
    start = time.time()
    results, model = ask_offline(args, tasks) if args.offline else ask_server(args, tasks)
    summary = report(tasks, results, args, model, time.time() - start)
    for family, accuracy in summary["accuracy"].items():
        print(f"{family:<11} {accuracy:6.1%}")
    print(f"{'overall':<11} {summary['overall']:6.1%}  ({summary['questions']} questions, "
          f"mean steps {summary['mean_steps']}, {summary['seconds']}s)")
    for failure in summary["failures"]:
        print(f"  wrong [{failure['family']}] {failure['prompt']!r}: expected {failure['expected']!r}, "
              f"got {failure['got']!r}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
