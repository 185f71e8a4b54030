"""`dfastllm serve --help`, and the mistakes found before any child starts:
each is one clear line and a non-zero exit, at once."""

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from dfastllm.supervisor import package_root
from dfastllm.config import ServerConfig
from dfastllm.lifetime import EXIT_CANNOT_START

ROOT = package_root()


def dfastllm_serve(*args: str, cwd=None, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DFASTLLM_")}
    return subprocess.run([sys.executable, "-m", "dfastllm.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**environment, **(env or {})})


def test_serve_help_shows_every_option_with_its_default_and_environment_variable():
    out = dfastllm_serve("--help").stdout
    flat = " ".join(out.split())
    for field in dataclasses.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in out, field.name
        assert f"env DFASTLLM_{field.name.upper()})" in flat, field.name
    assert "(default: 32; env DFASTLLM_MAX_BATCH_SIZE)" in flat
    assert "(default: 3; env DFASTLLM_LOAD_RETRIES)" in flat
    assert "(default: true; env DFASTLLM_WARMUP)" in flat


def test_an_unknown_flag_prints_the_usage_of_serve():
    done = dfastllm_serve("--max-batch", "4", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: dfastllm serve ")
    assert done.stderr.rstrip().endswith("dfastllm serve: error: unrecognized arguments: --bogus")


def test_invalid_option_values_are_refused_before_starting():
    done = dfastllm_serve("--max-batch-size", "0", timeout=30)
    assert done.returncode == 2
    assert "max_batch_size must be >= 1" in done.stderr


def test_a_directory_without_a_checkpoint_is_refused_before_starting(tmp_path):
    done = dfastllm_serve("--model", str(tmp_path), timeout=30)
    assert done.returncode == 2
    assert f"checkpoint directory {tmp_path} has no config.json" in done.stderr


def test_a_missing_checkpoint_directory_is_said_not_to_exist(tmp_path):
    done = dfastllm_serve("--model", "./no-such-model", cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == f"dfastllm serve: error: checkpoint directory {tmp_path}/no-such-model does not exist"


@pytest.mark.timeout(60)
def test_a_port_in_use_is_named_before_any_child_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = dfastllm_serve("--port", str(port), "--log-format", "text")
    assert done.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in done.stderr
    assert "started" not in done.stderr  # neither the engine nor Granian
    assert time.monotonic() - started < 30


def test_supervisor_and_engine_client_import_no_torch():
    code = ("import sys, dfastllm.cli, dfastllm.supervisor, dfastllm.engine.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_child_that_imported_another_copy_of_dfastllm_stops_naming_both(tmp_path):
    """What `dfastllm serve` gives its children: the folder of its packages.
    A child that found another dfastllm stops for good (no restart), saying where each is."""
    failure = tmp_path / "failure"
    env = {**os.environ, "DFASTLLM_PACKAGE_ROOT": str(tmp_path), "DFASTLLM_FAILURE_FILE": str(failure)}
    done = subprocess.run([sys.executable, "-c", "import dfastllm"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == EXIT_CANNOT_START
    message = failure.read_text()
    assert message in done.stderr and "Traceback" not in done.stderr
    assert os.path.join(ROOT, "dfastllm") in message and os.path.join(str(tmp_path), "dfastllm") in message


@pytest.fixture
def package_copy(tmp_path):
    """dfastllm and server copied with their compiled modules, to break them."""
    root = tmp_path / "root"
    for package in ("dfastllm", "server"):
        shutil.copytree(os.path.join(ROOT, package), root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def python_in(root, code: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DFASTLLM_")}, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=60)


def compiled(root, name: str) -> str:
    (path,) = [f for f in os.listdir(root / "dfastllm") if f.startswith(name + ".") and f.endswith(".so")]
    return str(root / "dfastllm" / path)


def test_a_compiled_module_built_for_another_python_is_named_at_import(package_copy):
    ipc = compiled(package_copy, "_ipc")
    os.rename(ipc, os.path.join(os.path.dirname(ipc), "_ipc.cpython-399-x86_64-linux-gnu.so"))
    done = python_in(package_copy, "import dfastllm")
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("dfastllm.ExtensionError: dfastllm's compiled module dfastllm._ipc cannot be loaded: "
                            "it is not built for this Python (found _ipc.cpython-399-x86_64-linux-gnu.so")
    assert "Rebuild it with `pip install" in error


@pytest.mark.timeout(60)
def test_a_broken_kernel_module_stops_serve_at_once_with_one_clear_line(package_copy):
    with open(compiled(package_copy, "_C"), "wb") as f:
        f.write(b"not a shared object")  # a stale or truncated build
    done = python_in(package_copy, "import dfastllm.ops")
    assert "dfastllm's compiled module dfastllm._C cannot be loaded: ImportError: " in done.stderr
    assert "Rebuild it with `pip install" in done.stderr

    env = {"PYTHONPATH": str(package_copy)}
    done = dfastllm_serve("--log-format", "text", cwd=package_copy, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "dfastllm._C cannot be loaded" in lines[0] and "pip install" in lines[0], done.stderr
