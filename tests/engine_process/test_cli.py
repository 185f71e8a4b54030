"""`dfastllm serve --help` and argument errors, without starting anything."""

import dataclasses
import subprocess
import sys

from dfastllm.config import ServerConfig


def test_serve_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "dfastllm.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for field in dataclasses.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in out, field.name
    assert "DFASTLLM_" in out


def test_invalid_option_values_are_refused_before_starting():
    done = subprocess.run([sys.executable, "-m", "dfastllm.cli", "serve", "--max-batch-size", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "max_batch_size must be >= 1" in done.stderr


def test_a_directory_without_a_checkpoint_is_refused_before_starting(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dfastllm.cli", "serve", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"checkpoint directory {tmp_path} has no config.json" in done.stderr


def test_supervisor_and_engine_client_import_no_torch():
    code = ("import sys, dfastllm.cli, dfastllm.supervisor, dfastllm.engine.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
