"""Load a LLaDA or Dream checkpoint (local directory or hub id) into our
native modules: config.json -> family, tokenizer, safetensors weights checked
name by name and shape by shape, then `load_state_dict(assign=True)` into a
model built on the meta device. One path for the 8B models and the tiny test
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time

import torch
from safetensors import safe_open

from dfastllm.models import dream, llada
from dfastllm.tokenizer import Tokenizer

# config.json `model_type` -> (family, config class, model class, name table).
FAMILIES = {
    "llada": ("llada", llada.LLaDAConfig, llada.LLaDAModel, llada.checkpoint_names),
    "Dream": ("dream", dream.DreamConfig, dream.DreamModel, dream.checkpoint_names),
}


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    config: llada.LLaDAConfig | dream.DreamConfig
    tokenizer: Tokenizer
    family: str  # "llada" | "dream"
    mask_token_id: int
    eos_token_id: int
    eot_token_id: int | None
    pad_token_id: int
    path: str  # the local checkpoint directory


def load_model(path_or_hub_id: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
               download=None) -> LoadedModel:
    """dtype defaults to bf16 on CUDA (the checkpoints' native dtype) and fp32
    elsewhere (CPU bf16 matmuls are slow and lose precision for no gain).
    `download(repo_id) -> directory` replaces the hub client (tests)."""
    directory = resolve_checkpoint(path_or_hub_id, download=download)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    config_path = os.path.join(directory, "config.json")
    hf_config = _read_json(config_path)
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{config_path}: unknown model_type {model_type!r} "
                         f"(supported: {', '.join(FAMILIES)})")
    family, config_cls, model_cls, checkpoint_names = FAMILIES[model_type]
    try:
        config = config_cls.from_hf_config(hf_config)
    except KeyError as e:
        raise ValueError(f"{config_path}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    tokenizer = Tokenizer.from_pretrained(directory)
    ids = _special_ids(hf_config, tokenizer, config_path, config.vocab_size)

    with torch.device("meta"):
        model = model_cls(config)
    names = checkpoint_names(config)  # checkpoint name -> ours
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    files = _weight_files(directory)
    _check_tensors(files, {ckpt: shapes[ours] for ckpt, ours in names.items()}, directory)

    state = {}
    for file, tensor_shapes in files.items():
        # Straight onto the device, one tensor at a time (no host copy of the model).
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in tensor_shapes:
                state[names[name]] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, family=family,
                       path=directory, **ids)


def _special_ids(hf_config: dict, tokenizer: Tokenizer, config_path: str, vocab_size: int) -> dict:
    """Mask and EOS from config.json (the model's own record), falling back to
    the tokenizer; end-of-turn (<|eot_id|>, <|im_end|>) from the tokenizer."""
    mask = hf_config.get("mask_token_id", tokenizer.mask_token_id)
    if mask is None:
        raise ValueError(f"{config_path}: no mask_token_id and the tokenizer names no mask token")
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id != mask:
        raise ValueError(f"{config_path}: mask_token_id {mask} but the tokenizer's mask token "
                         f"is id {tokenizer.mask_token_id}")
    eos = hf_config.get("eos_token_id", tokenizer.eos_token_id)
    if isinstance(eos, list):  # some configs list several; the first is the end of text
        eos = eos[0]
    if eos is None:
        raise ValueError(f"{config_path}: no eos_token_id and the tokenizer names no eos token")
    pad = hf_config.get("pad_token_id")
    ids = dict(mask_token_id=mask, eos_token_id=eos, eot_token_id=tokenizer.eot_token_id,
               pad_token_id=eos if pad is None else pad)
    for name, value in ids.items():
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{config_path}: {name} {value} is outside the vocabulary ({vocab_size})")
    return ids


def _weight_files(directory: str) -> dict[str, dict[str, tuple]]:
    """safetensors file -> {tensor name: shape} (single file or sharded)."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index_path):
        shard_names = sorted(set(_read_json(index_path)["weight_map"].values()))
        paths = [os.path.join(directory, s) for s in shard_names]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{index_path} names shard {p}, which does not exist")
    elif os.path.isfile(single_path):
        paths = [single_path]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    files = {}
    for p in paths:
        with safe_open(p, framework="pt") as f:
            files[p] = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    return files


def _check_tensors(files: dict[str, dict[str, tuple]], expected: dict[str, tuple],
                   directory: str) -> None:
    """Every expected tensor present once with its shape, nothing else."""
    seen = {}
    for file, shapes in files.items():
        for name, shape in shapes.items():
            if name not in expected:
                raise ValueError(f"{file}: unexpected tensor {name}")
            if name in seen:
                raise ValueError(f"{file}: tensor {name} is also in {seen[name]}")
            if shape != expected[name]:
                raise ValueError(f"{file}: tensor {name} has shape {list(shape)}, "
                                 f"expected {list(expected[name])}")
            seen[name] = file
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ValueError(f"{directory}: missing tensor {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- hub resolution -----------------------------------------------------------

def resolve_checkpoint(path_or_hub_id, *, download=None, attempts: int = 5,
                       base_delay_s: float = 1.0, max_delay_s: float = 30.0,
                       sleep=time.sleep) -> str:
    """A local directory as is; otherwise a hub id, downloaded with retries.

    Transient failures (network, timeouts, IO, HTTP 429/5xx) are retried with
    exponential backoff and full jitter, up to `attempts` tries; permanent ones
    (unknown repo, gated, 4xx, bad id, offline mode) fail at once."""
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if download is None:
        from huggingface_hub import snapshot_download

        def download(repo_id):
            return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    for attempt in range(1, attempts + 1):
        try:
            return download(path)
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise CheckpointDownloadError(
                    f"{path} is not a local directory, and downloading it from the hub failed "
                    f"after {attempt} attempt(s): {type(e).__name__}: {e}") from e
            sleep(random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1))))
    raise AssertionError("unreachable")


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
