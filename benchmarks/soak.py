"""Soak test: load a `dfastllm serve` for a set time and watch its memory.

Every `--interval-s` it samples the resident memory of every server process
(supervisor, engine, Granian's master and each worker: RSS and its
anonymous part, from /proc) and the `dfastllm:internal_entries` tables of
/metrics, and prints one line. At the end it prints, per process and per
table, the slope after the warm-up (least squares, per minute), so a creep
shows as a number, and a table that fills to its bound shows flat once full.

    python benchmarks/soak.py --minutes 30 --interval-s 30 --warmup-minutes 10 --json /tmp/soak.json
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid SUPERVISOR_PID --minutes 30

Without --url it starts `dfastllm serve --workers 2` on a free port (the
embedded model unless `--serve-arg=--model --serve-arg=DIR` say otherwise)
and stops it at the end. The load is its own: `--concurrency` clients, each
sending its next request as soon as the last ended, a fixed mix of the ways
real clients use the server (chat streamed, whole, and streamed but
abandoned after the first chunk, completions, tokenize, and a malformed
body), the chat questions of benchmarks/tiny_chat.py.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx

from tiny_chat import chat_body

# The mix of requests, by weight.
MIX = {"chat_stream": 6, "chat_whole": 3, "chat_abandoned": 2, "completion": 1, "tokenize": 1, "malformed": 1}


def descendants(pid: int) -> list[int]:
    """pid and every process under it."""
    found = [pid]
    for p in found:
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    found.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return found


def role(pid: int, supervisor: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        return "gone"
    if pid == supervisor:
        return "supervisor"
    if b"dfastllm.engine.process" in cmdline:
        return "engine"
    if b"server.launch" in cmdline:
        return "http" if parent == supervisor else "worker"
    return "other"  # e.g. multiprocessing's resource tracker


MEMORY_FIELDS = {"VmRSS": "rss_kib", "RssAnon": "anon_kib", "RssFile": "file_kib", "RssShmem": "shmem_kib"}


def memory_kib(pid: int) -> dict[str, int]:
    """Resident memory (KiB) and its parts: anonymous (the heaps), mapped
    files (libraries, the metrics files) and shared memory (the rings, whose
    pages count once a process has touched them: they fill up to the rings'
    capacity as the write positions first go round)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in MEMORY_FIELDS:
                    values[MEMORY_FIELDS[name]] = int(rest.split()[0])
    except FileNotFoundError:
        return {}
    return values


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def internal_entries(text: str) -> dict[str, float]:
    prefix = 'dfastllm:internal_entries{table="'
    return {line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else None


@dataclasses.dataclass
class Load:
    """The soak's clients and what they saw."""
    url: str
    model: str
    concurrency: int
    seed: int = 0
    counts: dict = dataclasses.field(default_factory=dict)
    errors: list = dataclasses.field(default_factory=list)
    sent: int = 0  # requests finished (any outcome), for the tables' bounds

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=120) as client:
            await asyncio.gather(*(self._client(client, i, stop) for i in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1000 + index)
        kinds, weights = list(MIX), list(MIX.values())
        turn = index
        while not stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            turn += 1
            try:
                outcome = await getattr(self, kind)(client, turn)
            except httpx.HTTPError as error:
                outcome = f"{type(error).__name__}: {error}"
            self.sent += 1
            key = kind if outcome == "ok" else f"{kind}: error"
            self.counts[key] = self.counts.get(key, 0) + 1
            if outcome != "ok" and len(self.errors) < 20:
                self.errors.append(f"{kind}: {outcome}")

    async def chat_stream(self, client, turn: int, *, abandon: bool = False) -> str:
        async with client.stream("POST", "/v1/chat/completions", json=chat_body(self.model, turn, stream=True)) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return event["error"]["message"]
                    if abandon and any(c["delta"].get("content") for c in event["choices"]):
                        return "ok"  # leaving the block closes the connection: the server cancels
        return "ok"

    async def chat_abandoned(self, client, turn: int) -> str:
        return await self.chat_stream(client, turn, abandon=True)

    async def chat_whole(self, client, turn: int) -> str:
        r = await client.post("/v1/chat/completions", json=chat_body(self.model, turn, stream=False))
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        return "ok" if r.json()["choices"][0]["message"]["content"] else "an empty answer"

    async def completion(self, client, turn: int) -> str:
        r = await client.post("/v1/completions",
                              json={"model": self.model, "prompt": f"Soak {turn}", "max_tokens": 8})
        return "ok" if r.status_code == 200 else f"HTTP {r.status_code}"

    async def tokenize(self, client, turn: int) -> str:
        r = await client.post("/v1/tokenize", json={"model": self.model, "prompt": f"Soak {turn}"})
        return "ok" if r.status_code == 200 else f"HTTP {r.status_code}"

    async def malformed(self, client, turn: int) -> str:
        r = await client.post("/v1/chat/completions", content=b'{"model": ',
                              headers={"Content-Type": "application/json"})
        return "ok" if r.status_code == 400 else f"HTTP {r.status_code} for a malformed body"


async def sample(url: str, supervisor: int, started: float, load: Load) -> dict:
    processes = {}
    for pid in descendants(supervisor):
        name = role(pid, supervisor)
        if name != "gone":
            processes[f"{name}:{pid}"] = {**memory_kib(pid), "fds": open_fds(pid)}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            tables = internal_entries((await client.get(url + "/metrics")).text)
    except httpx.HTTPError:
        tables = {}
    return {"t": time.monotonic() - started, "requests": load.sent, "processes": processes, "tables": tables}


def summary(samples: list[dict], warmup_s: float) -> dict:
    """Per process and table: first and last value after the warm-up and the slope per minute."""
    after = [s for s in samples if s["t"] >= warmup_s] or samples
    result = {"processes": {}, "tables": {}}
    for name in sorted({p for s in after for p in s["processes"]}):
        points = [(s["t"], s["processes"][name]) for s in after if name in s["processes"]]
        result["processes"][name] = {
            key: {"first": points[0][1][key], "last": points[-1][1][key],
                  "slope_per_min": slope_per_minute([(t, v[key]) for t, v in points])}
            for key in MEMORY_FIELDS.values()}
    for table in sorted({t for s in after for t in s["tables"]}):
        points = [(s["t"], s["tables"][table]) for s in after if table in s["tables"]]
        result["tables"][table] = {"first": points[0][1], "last": points[-1][1], "max": max(v for _, v in points),
                                   "slope_per_min": slope_per_minute(points)}
    return result


def print_sample(s: dict) -> None:
    memory = " ".join(f"{name}={p['rss_kib'] / 1024:.1f}/{p['anon_kib'] / 1024:.1f}/{p['shmem_kib'] / 1024:.1f}"
                      for name, p in sorted(s["processes"].items()))
    tables = " ".join(f"{k}={v:.0f}" for k, v in sorted(s["tables"].items()))
    print(f"t={s['t']:7.0f}s requests={s['requests']:7d} rss/anon/shmem MiB: {memory} | {tables}", flush=True)


def print_summary(result: dict) -> None:
    print("after warm-up, slope per minute (KiB/min for memory, entries/min for tables):")
    for name, keys in result["processes"].items():
        rss = keys["rss_kib"]
        parts = ", ".join(f"{key.removesuffix('_kib')} {_fmt(keys[key]['slope_per_min'])}"
                          for key in ("anon_kib", "file_kib", "shmem_kib"))
        print(f"  {name:>20}  rss {rss['first'] / 1024:7.1f} -> {rss['last'] / 1024:7.1f} MiB, "
              f"slope {_fmt(rss['slope_per_min'])} KiB/min ({parts})")
    for table, t in result["tables"].items():
        print(f"  {table:>28}  {t['first']:.0f} -> {t['last']:.0f} (max {t['max']:.0f}), "
              f"slope {_fmt(t['slope_per_min'])}/min")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def start_server(serve_args: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "dfastllm.cli", "serve", "--port", str(port), "--workers", "2", *serve_args]
    process = subprocess.Popen(argv, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dfastllm serve exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"dfastllm serve not ready in 180 s; see {log_path}")


async def soak(url: str, supervisor: int, *, seconds: float, interval_s: float, concurrency: int,
               idle_s: float = 0.0, seed: int = 0) -> dict:
    """Run the load for `seconds`, sampling every `interval_s`; then, with
    `idle_s`, keep sampling that long with no load (what the tables hold
    once requests end). Returns the samples and the load's counts."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
    load = Load(url, model, concurrency, seed=seed)
    stop = asyncio.Event()
    started = time.monotonic()
    samples = [await sample(url, supervisor, started, load)]
    print_sample(samples[-1])
    clients = asyncio.create_task(load.run(stop))
    for end, loaded in ((seconds, True), (seconds + idle_s, False)):
        while time.monotonic() - started + interval_s <= end + 1e-6:
            await asyncio.sleep(started + samples[-1]["t"] + interval_s - time.monotonic())
            samples.append(await sample(url, supervisor, started, load) | {"loaded": loaded})
            print_sample(samples[-1])
        if loaded:
            stop.set()
            await clients
    return {"samples": samples, "counts": load.counts, "errors": load.errors, "requests": load.sent}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (with --pid); default: start one")
    parser.add_argument("--pid", type=int, help="the supervisor's pid of the server at --url")
    parser.add_argument("--serve-arg", action="append", default=[], help="an argument for the started server")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval-s", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=10.0, help="left out of the slopes")
    parser.add_argument("--idle-s", type=float, default=0.0, help="sampling with no load after the run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--log", default="/tmp/dfastllm-soak-serve.log", help="the started server's output")
    parser.add_argument("--json", help="write the samples and the summary here")
    args = parser.parse_args(argv)
    if (args.url is None) != (args.pid is None):
        parser.error("--url and --pid go together")

    process = None
    url, pid = args.url, args.pid
    if url is None:
        process, url = start_server(args.serve_arg, args.log)
        pid = process.pid
    try:
        report = asyncio.run(soak(url, pid, seconds=60 * args.minutes, interval_s=args.interval_s,
                                  concurrency=args.concurrency, idle_s=args.idle_s))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    report["summary"] = summary([s for s in report["samples"] if s.get("loaded", True)], 60 * args.warmup_minutes)
    print(f"requests: {report['requests']} {report['counts']}")
    for error in report["errors"]:
        print(f"  error: {error}")
    print_summary(report["summary"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
