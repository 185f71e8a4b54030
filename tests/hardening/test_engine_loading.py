"""Model loading under failure: a checkpoint that can never load makes a
real `dfastllm serve` (2 workers) give up at once with the reason, without
restart loops; transient failures (a hub download, an I/O error reading the
files) are retried with backoff and the load succeeds."""

from __future__ import annotations

import errno
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfastllm.models import loader
from dfastllm.models.loader import load_model
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
