"""A two-minute soak (benchmarks/soak.py) of a real `dfastllm serve` on the
embedded model, 2 workers: no table that requests fill grows with the
number of requests. The tables are counts, not timings, so the bounds are
exact on any machine however busy:
- a table of requests in flight never holds more than the clients can have
  open (2 x concurrency, the engine's and the worker's views together), and
  is empty once the load stops;
- the engine's dedup table never holds more ids than the requests sent in
  one dedup window (30 s here), so it levels off once the window is full.
A table that kept an entry per request breaks one of these within the run.
The memory of each process is printed with its slope (see benchmarks/RESULTS.md
for a 30-minute curve), not asserted: RSS is too noisy for a pass/fail here."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import httpx
import pytest

from serve_process import serving, wait_for

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "benchmarks"))
import soak  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

pytestmark = pytest.mark.timeout(420)

SECONDS = 120
INTERVAL_S = 10
CONCURRENCY = 6
DEDUP_WINDOW_S = 30
# The engine publishes its tables every 2 s (DEVICE_MEMORY_INTERVAL_S): a sample may be that old.
PUBLISH_LAG_S = 2
WINDOWED = {"engine_recent_ids"}


def test_no_table_grows_with_the_number_of_requests(tmp_path):
    with serving(None, str(tmp_path / "serve.log"), "--workers", "2", "--no-warmup",
                 "--dedup-window-s", str(DEDUP_WINDOW_S)) as serve:
        report = asyncio.run(soak.soak(serve.base_url, serve.process.pid, seconds=SECONDS, interval_s=INTERVAL_S,
                                       concurrency=CONCURRENCY))
        in_flight = None

        def emptied() -> bool:
            # A worker sets its gauges at the end of each request: a few on fresh
            # connections, so that both report what they hold now.
            nonlocal in_flight
            for _ in range(4):
                httpx.get(serve.base_url + "/health/live")
            tables = soak.internal_entries(httpx.get(serve.base_url + "/metrics").text)
            in_flight = {name: size for name, size in tables.items() if name not in WINDOWED}
            return not any(in_flight.values())

        assert wait_for(emptied, timeout=30), in_flight
    soak.print_summary(soak.summary(report["samples"], SECONDS / 3))
    assert not report["errors"], report["errors"]
    samples = report["samples"]
    assert report["requests"] > 100 and len(samples) >= SECONDS // INTERVAL_S, (report["requests"], len(samples))
    tables = {name for s in samples for name in s["tables"]}
    assert WINDOWED <= tables and {"client_streams", "engine_live_requests"} <= tables, tables

    for name in sorted(tables - WINDOWED):
        sizes = [s["tables"].get(name, 0) for s in samples]
        assert max(sizes) <= 2 * CONCURRENCY, (name, sizes)

    checked = 0
    for i, s in enumerate(samples):
        # The latest sample taken at least a window (and the publishing lag) before this one.
        before = [b for b in samples[:i] if b["t"] <= s["t"] - DEDUP_WINDOW_S - PUBLISH_LAG_S - 1]
        if before:
            sent_in_window = s["requests"] - before[-1]["requests"] + CONCURRENCY
            assert s["tables"]["engine_recent_ids"] <= sent_in_window, (s["t"], s["tables"], sent_in_window)
            checked += 1
    assert checked >= (SECONDS - DEDUP_WINDOW_S) // INTERVAL_S - 2
