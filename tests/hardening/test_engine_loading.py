"""Model loading under failure: a checkpoint that can never load makes a
real `dfastllm serve` (2 workers) give up at once with the reason, without
restart loops; transient failures (a hub download, an I/O error reading the
files) are retried with backoff and the load succeeds."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfastllm.models import loader
from dfastllm.models.loader import load_model
from dfastllm.testing import write_tiny_llada
from engine_harness import EngineServer
from serve_process import tiny_checkpoint

torch.set_num_threads(1)


@pytest.mark.timeout(120)
def test_serve_fails_fast_with_the_message_on_a_checkpoint_missing_a_tensor(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path)
    weights = load_file(f"{checkpoint}/model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, f"{checkpoint}/model.safetensors")

    started = time.monotonic()
    server = EngineServer(tmp_path, "--load-retries", "10", model=checkpoint)
    try:
        code = server.process.wait(90)
    finally:
        server.stop()
    elapsed = time.monotonic() - started

    assert code != 0
    records = server.log_records()
    giving_up = [r for r in records if r.get("role") == "supervisor" and r.get("level") == "error"
                 and "missing tensor" in r.get("message", "")]
    assert giving_up, server.log_tail()
    assert dropped in giving_up[0]["message"] and checkpoint in giving_up[0]["message"]
    engine_starts = [r for r in records if r.get("message") == "engine process started"]
    assert len(engine_starts) == 1, "a permanent error must not be retried by restarting the engine"
    # With restarts (backoff 1, 2, 4, ... s) ten tries would take minutes.
    assert elapsed < 60
    assert server.segments() == []


def test_a_flaky_hub_download_is_retried_with_backoff(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path)
    attempts, delays = [], []

    def flaky_download(repo_id: str) -> str:
        attempts.append(repo_id)
        if len(attempts) < 3:
            raise ConnectionError("connection reset by peer")
        return checkpoint

    loaded = load_model("org/tiny-llada", download=flaky_download, sleep=delays.append)
    assert attempts == ["org/tiny-llada"] * 3
    assert len(delays) == 2 and 0 <= delays[0] <= 1.0 and 0 <= delays[1] <= 2.0  # full jitter under 1 s, 2 s
    assert loaded.path == checkpoint and loaded.family == "llada"


def test_a_permanent_hub_error_is_not_retried(tmp_path):
    attempts = []

    def missing_repo(repo_id: str) -> str:
        attempts.append(repo_id)
        raise FileNotFoundError(f"{repo_id}: no such repository")

    with pytest.raises(loader.CheckpointDownloadError, match="no such repository"):
        load_model("org/missing", download=missing_repo, sleep=lambda s: pytest.fail("slept on a permanent error"))
    assert len(attempts) == 1


def test_transient_io_errors_reading_the_checkpoint_are_retried(tmp_path, monkeypatch):
    # A failing disk cannot be made here: the OS error comes from a wrapper
    # around safetensors' file opening, the loader's only I/O on the weights.
    checkpoint = tiny_checkpoint(tmp_path)
    real_safe_open = loader.safe_open
    failures = []

    def flaky_safe_open(path, *args, **kwargs):
        if len(failures) < 2:
            failures.append(path)
            raise OSError(errno.EIO, "Input/output error", path)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(loader, "safe_open", flaky_safe_open)
    delays = []
    loaded = load_model(checkpoint, sleep=delays.append)
    assert len(failures) == 2 and len(delays) == 2
    reference = load_model(checkpoint, attempts=1)
    for (name, tensor), (_, expected) in zip(loaded.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(tensor, expected), name


def test_a_corrupt_weights_file_fails_at_once_as_a_permanent_error(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path)
    with open(f"{checkpoint}/model.safetensors", "r+b") as f:
        f.write(b"\xff" * 8)  # the header length: now absurd
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(checkpoint, sleep=lambda s: pytest.fail("slept on a permanent error"))


@pytest.mark.timeout(150)
def test_serve_without_a_network_logs_one_line_per_attempt_then_exits_non_zero(tmp_path):
    """A hub id and no hub: the download is tried a few times, one line each
    and no traceback, then `dfastllm serve` exits non-zero (an orchestrator
    restarts the pod) instead of restarting its children for ever."""
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        hub = f"http://127.0.0.1:{closed.getsockname()[1]}"
    server = EngineServer(tmp_path, "--load-retries", "1", model="some-org/some-model",
                          env={"HF_ENDPOINT": hub, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"})
    try:
        code = server.process.wait(120)
    finally:
        server.stop()
    assert code not in (0, None)
    with open(server.log_path, encoding="utf-8") as f:
        log = f.read()
    assert "Traceback" not in log
    records = server.log_records()
    assert len(records) == len(log.splitlines()), "every line of the log is one record"
    attempts = [r["message"] for r in records if "from the hub failed (attempt" in r.get("message", "")]
    assert attempts and all("some-org/some-model" in m and "retrying in" in m for m in attempts)
    giving_up = [r for r in records if r.get("role") == "supervisor" and r.get("level") == "error"]
    # Whichever side gives up first (the engine after --load-retries, or the
    # HTTP workers, which resolve the same checkpoint for its tokenizer), the
    # supervisor's own error names the model.
    assert any("some-org/some-model" in r["message"] for r in giving_up), server.log_tail()
    assert server.segments() == []


def test_loading_a_sharded_checkpoint_logs_its_progress(tmp_path, caplog):
    checkpoint = write_tiny_llada(tmp_path / "sharded", seed=3, shard=True)
    with caplog.at_level(logging.INFO, logger="dfastllm.models.loader"):
        loaded = load_model(checkpoint)
    lines = [r.getMessage() for r in caplog.records if r.name == "dfastllm.models.loader"]
    tensors = sum(len(load_file(shard)) for shard in shard_files(checkpoint))  # the checkpoint's, before fusion
    assert len(loaded.model.checkpoint_parameters()) == tensors
    assert lines[0].startswith(f"loading {checkpoint}: 3 file(s), {tensors} tensors, ")
    for i, shard in enumerate(shard_files(checkpoint), 1):
        assert lines[i].startswith(f"read {os.path.basename(shard)} ({i} of 3): {len(load_file(shard))} tensors, ")
    assert lines[4].startswith(f"loaded {tensors} tensors, ") and " GB in " in lines[4]


def test_a_progress_bar_replaces_the_per_file_lines_on_request(tmp_path, caplog, capfd):
    checkpoint = write_tiny_llada(tmp_path / "sharded", seed=3, shard=True)
    with caplog.at_level(logging.INFO, logger="dfastllm.models.loader"):
        load_model(checkpoint, progress_bar=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "dfastllm.models.loader"]
    assert len(lines) == 2 and lines[0].startswith("loading ") and lines[1].startswith("loaded ")
    bar = capfd.readouterr().err
    assert "loading weights: 100%" in bar, bar
    assert bar.count("|") >= 2  # tqdm's bar


def shard_files(checkpoint: str) -> list[str]:
    return sorted(os.path.join(checkpoint, f) for f in os.listdir(checkpoint) if f.endswith(".safetensors"))
