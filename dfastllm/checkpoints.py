"""Where a checkpoint lives: the embedded default model, a local directory,
or a hub id downloaded with retries. Torch-free: the HTTP workers resolve the
served model's config and tokenizer through it too.

`retry_with_backoff` is the one retry loop of model loading (the hub
download here, reading the files in `dfastllm.models.loader`)."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The embedded default model of `dfastllm serve` and `dfastllm.LLM()`.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-llada")
WEIGHT_FILES = ("*.json", "*.safetensors", "*.jinja")
CONFIG_FILES = ("*.json", "*.jinja")
# config.json `model_type` -> the family we implement it as.
MODEL_FAMILIES = {"llada": "llada", "Dream": "dream", "llada2_moe": "llada2"}


def is_local_path(path: str) -> bool:
    """Whether `path` names a local directory (existing, or spelled as a
    path) rather than a hub id such as "GSAI-ML/LLaDA-8B-Instruct"."""
    return os.path.isdir(path) or path.startswith((".", "/", "~")) or path.count("/") > 1


def resolve_checkpoint(path_or_hub_id, *, files=WEIGHT_FILES, download=None, attempts: int = 5,
                       base_delay_s: float = 1.0, max_delay_s: float = 30.0,
                       sleep=time.sleep) -> str:
    """A local directory as is; otherwise a hub id, downloaded with retries
    (only the `files` patterns: the HTTP workers need no weights).

    Transient failures (network, timeouts, IO, HTTP 429/5xx) are retried with
    exponential backoff and full jitter, up to `attempts` tries; permanent ones
    (unknown repo, gated, 4xx, bad id, offline mode) fail at once."""
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if is_local_path(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if download is None:
        from huggingface_hub import snapshot_download

        def download(repo_id):
            return snapshot_download(repo_id, allow_patterns=list(files))
    tries = 0

    def attempt() -> str:
        nonlocal tries
        tries += 1
        return download(path)

    try:
        return retry_with_backoff(attempt, what=f"downloading {path} from the hub", attempts=attempts,
                                  base_delay_s=base_delay_s, max_delay_s=max_delay_s, sleep=sleep)
    except Exception as e:
        raise CheckpointDownloadError(f"{path} is not a local directory, and downloading it from the hub failed "
                                      f"after {tries} attempt(s): {one_line(e)}") from e


def retry_with_backoff(fn: Callable[[], T], *, what: str, attempts: int, base_delay_s: float = 1.0,
                       max_delay_s: float = 30.0, sleep=time.sleep,
                       retryable: Callable[[BaseException], bool] | None = None) -> T:
    """fn()'s result. A failure that `retryable` (default `is_transient`)
    judges worth another try is retried after an exponential backoff with
    full jitter (uniform in [0, min(max_delay_s, base_delay_s * 2^(n-1))]
    after the n-th failure), up to `attempts` tries in all, each retry
    logged in one line; the last failure, or a permanent one, is raised."""
    retryable = retryable or is_transient
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not retryable(e):
                raise
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1)))
            logger.warning("%s failed (attempt %d of %d): %s; retrying in %.1f s", what, attempt, attempts,
                           one_line(e), delay)
            sleep(delay)
    raise AssertionError("unreachable")


def one_line(error: BaseException) -> str:
    """"Type: message" on one line (the hub client's messages span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


class CheckpointDownloadError(OSError):
    """A hub id could not be downloaded; `__cause__` is the last error."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying a failed hub download may succeed."""
    try:
        from huggingface_hub import errors as hub
        permanent = (hub.RepositoryNotFoundError, hub.RevisionNotFoundError,
                     hub.HFValidationError, hub.OfflineModeIsEnabled)
    except ImportError:
        permanent = ()
    if isinstance(exc, permanent):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    if isinstance(exc, (TimeoutError, ConnectionError)) or _is_transport_error(exc):
        return True
    # The hub client wraps a network failure (e.g. LocalEntryNotFoundError
    # when nothing is cached); judge it by its cause.
    if exc.__cause__ is not None:
        return is_transient(exc.__cause__)
    return isinstance(exc, OSError) and not isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def _is_transport_error(exc: BaseException) -> bool:
    # httpx (and httpx2, which huggingface_hub uses) and requests transport
    # failures: connection refused/reset, timeouts, protocol errors. A library
    # that is not imported cannot have raised.
    for module, names in (("httpx", ("TransportError",)), ("httpx2", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, tuple(getattr(mod, n) for n in names)):
            return True
    return False
