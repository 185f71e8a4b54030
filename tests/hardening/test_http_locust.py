"""benchmarks/locustfile.py measures the default model: a short headless
locust run against `dfastllm serve` with no --model (the embedded tiny
model) has no failures and shows the streamed answers' time to first token,
inter-token and end-to-end rows, which only content chunks produce."""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys

import pytest

from serve_process import serving

pytestmark = pytest.mark.timeout(240)

LOCUSTFILE = pathlib.Path(__file__).parents[2] / "benchmarks" / "locustfile.py"


def test_a_headless_run_against_the_default_model_reports_ttft_and_inter_token_rows(tmp_path):
    with serving(None, str(tmp_path / "serve.log"), "--workers", "2") as serve:
        run = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "4",
                              "-r", "4", "-t", "12s", "--host", serve.base_url, "--csv", str(tmp_path / "locust"),
                              "--only-summary", "--loglevel", "WARNING"],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with open(tmp_path / "locust_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, rows
    for name in ("ttft", "inter-token", "e2e"):
        assert int(rows[("SSE", name)]["Request Count"]) > 0, (name, sorted(rows))
    streamed = int(rows[("POST", "/v1/chat/completions stream")]["Request Count"])
    # Every streamed answer had content (a locust stopped mid-stream may have timed one more first token).
    assert int(rows[("SSE", "ttft")]["Request Count"]) >= streamed > 0
