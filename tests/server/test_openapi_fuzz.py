"""The OpenAPI document tells the truth: schemathesis, with every check,
against the real `dfastllm serve` with no keys and with API and admin keys.

A bounded version of `schemathesis run http://HOST/openapi.json --checks
all` from the repository root (whose `schemathesis.toml` loads
`schemathesis_hooks.py`): a fixed seed and a few hundred cases per server,
fuzzing and stateful phases, so that it stays well under 2 minutes here.
A request that hangs fails it too (the per-request timeout)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from serve_process import MODEL, serving, tiny_checkpoint

KEY = "fuzz-key"
ADMIN_KEY = "fuzz-admin"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_ARGS = ("--served-model-name", MODEL, "--max-model-len", "64", "--no-warmup")

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("schemathesis", path=os.path.dirname(sys.executable)) is None,
                                 reason="schemathesis is not installed (the test extra)")]


def schemathesis(base_url: str, *args: str, examples: int = 15) -> int:
    """Run schemathesis's CLI; -> the number of cases it generated (it fails the test on any failure)."""
    argv = [shutil.which("schemathesis", path=os.path.dirname(sys.executable)), "run", f"{base_url}/openapi.json",
            "--checks", "all", "--seed", "14", "--max-examples", str(examples), "--phases", "fuzzing,stateful",
            "--request-timeout", "30", "--generation-database", "none", "--no-color", *args]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    return int(re.search(r"(\d+) generated", output).group(1))


def test_no_keys(tmp_path):
    with serving(tiny_checkpoint(tmp_path), str(tmp_path / "serve.log"), *SERVE_ARGS) as server:
        assert schemathesis(server.base_url) >= 150


def test_api_and_admin_keys(tmp_path):
    with serving(tiny_checkpoint(tmp_path), str(tmp_path / "serve.log"), *SERVE_ARGS,
                 "--api-keys", KEY, "--admin-keys", ADMIN_KEY) as server:
        # An API key: the admin API answers 403 to it.
        assert schemathesis(server.base_url, "-H", f"Authorization: Bearer {KEY}") >= 150
        # The admin key on the admin API (last: its PATCHes change the settings).
        assert schemathesis(server.base_url, "-H", f"Authorization: Bearer {ADMIN_KEY}",
                            "--include-path", "/admin/config", examples=40) >= 50
