"""Load a LLaDA, Dream or LLaDA2 checkpoint (local directory or hub id) into our
native modules: config.json -> family, tokenizer, safetensors weights checked
name by name and shape by shape, then copied into a model built on the meta
device and allocated on the target one (q|k|v and gate|up fused in place).
One path for the 8B models and the tiny test checkpoints.

Loading survives transient failures: a hub download (`dfastllm.checkpoints`)
and reading the local files (an I/O error on a network filesystem) are
retried with exponential backoff and full jitter; permanent errors (a
malformed config.json, an unknown model_type, a missing or misshapen tensor,
a missing file, an unparsable safetensors file) raise at once with a message
naming the file and what is wrong.

Loading says what it does at info level: the files, tensors and bytes to
read, each file as it is read (or a progress bar over the bytes, with
`progress_bar`, for a terminal), and the total with its time, so a model
that takes a minute to load is never a minute of silence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import torch
from safetensors import SafetensorError, safe_open

from dfastllm.checkpoints import (  # noqa: F401 (API)
    MODEL_FAMILIES,
    CheckpointDownloadError,
    is_transient,
    resolve_checkpoint,
    retry_with_backoff,
)
from dfastllm.models import dream, llada, llada2
from dfastllm.models.fp8 import quantize_fp8
from dfastllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

QUANTIZATIONS = (None, "fp8")
READ_ATTEMPTS = 4  # tries at reading a local checkpoint while its I/O errors look transient

# family (checkpoints.MODEL_FAMILIES) -> (config class, model class, name table).
FAMILIES = {
    "llada": (llada.LLaDAConfig, llada.LLaDAModel, llada.checkpoint_names),
    "dream": (dream.DreamConfig, dream.DreamModel, dream.checkpoint_names),
    "llada2": (llada2.LLaDA2Config, llada2.LLaDA2Model, llada2.checkpoint_names),
}

# Mask and EOS ids of a family whose released config.json omits them and
# whose published generate() hard-codes them: the last resort after
# config.json and the tokenizer.
FAMILY_DEFAULT_IDS = {
    "llada2": {"mask_token_id": llada2.DEFAULT_MASK_TOKEN_ID, "eos_token_id": llada2.DEFAULT_EOS_TOKEN_ID},
}


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    config: llada.LLaDAConfig | dream.DreamConfig | llada2.LLaDA2Config
    tokenizer: Tokenizer
    family: str  # "llada" | "dream" | "llada2"
    mask_token_id: int
    eos_token_id: int
    eot_token_id: int | None
    pad_token_id: int
    path: str  # the local checkpoint directory
    # generation_config.json when the checkpoint has one (decoding defaults, e.g. LLaDA2.1's).
    generation_config: dict = dataclasses.field(default_factory=dict)


def load_model(path_or_hub_id: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
               quantization: str | None = None, download=None, attempts: int = READ_ATTEMPTS,
               base_delay_s: float = 1.0, max_delay_s: float = 30.0, sleep=time.sleep,
               progress_bar: bool = False) -> LoadedModel:
    """dtype defaults to bf16 on CUDA (the checkpoints' native dtype) and fp32
    elsewhere (CPU bf16 matmuls are slow and lose precision for no gain).
    `download(repo_id) -> directory` replaces the hub client (tests). Reading
    the files gets up to `attempts` tries while its errors look transient
    (`is_transient`); the download retries on its own terms. `progress_bar`:
    draw a bar on stderr while reading the weights (for a terminal).
    quantization: None, or "fp8" (e4m3 block weights, `dfastllm.models.fp8`)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    directory = resolve_checkpoint(path_or_hub_id, download=download, sleep=sleep)
    return retry_with_backoff(lambda: _load_directory(directory, device, dtype, quantization, progress_bar),
                              what=f"reading the checkpoint {directory}", attempts=attempts,
                              base_delay_s=base_delay_s, max_delay_s=max_delay_s, sleep=sleep)


def _load_directory(directory: str, device, dtype: torch.dtype | None, quantization: str | None,
                    progress_bar: bool) -> LoadedModel:
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    config_path = os.path.join(directory, "config.json")
    hf_config = _read_json(config_path)
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"{config_path}: unknown model_type {model_type!r} "
                         f"(supported: {', '.join(MODEL_FAMILIES)})")
    family = MODEL_FAMILIES[model_type]
    if quantization == "fp8" and family == "llada2":
        raise ValueError("quantization fp8 is not supported for LLaDA2: its routed experts are stacked "
                         "parameters multiplied by grouped GEMMs, which have no fp8 path")
    config_cls, model_cls, checkpoint_names = FAMILIES[family]
    try:
        config = config_cls.from_hf_config(hf_config)
    except KeyError as e:
        raise ValueError(f"{config_path}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    tokenizer = Tokenizer.from_pretrained(directory)
    ids = _special_ids(hf_config, tokenizer, config_path, config.vocab_size, FAMILY_DEFAULT_IDS.get(family, {}))

    with torch.device("meta"):
        model = model_cls(config)
    # Allocated (uninitialised) on the device, then filled tensor by tensor:
    # the fused q|k|v and gate|up matrices take their checkpoint parts in
    # place, with no second copy of a layer (so not load_state_dict).
    model = model.to(dtype).to_empty(device=device)
    targets = model.checkpoint_parameters()  # our name (parts of fused and stacked tensors too) -> tensor
    names = checkpoint_names(config)  # checkpoint name -> ours
    files = _weight_files(directory)
    _check_tensors(files, {ckpt: tuple(targets[ours].shape) for ckpt, ours in names.items()}, directory)

    _read_weights(files, names, targets, directory, progress_bar)
    model.eval().requires_grad_(False)
    if quantization == "fp8":
        quantize_fp8(model)
    generation_path = os.path.join(directory, "generation_config.json")
    generation_config = _read_json(generation_path) if os.path.isfile(generation_path) else {}
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, family=family,
                       path=directory, generation_config=generation_config, **ids)


def _read_weights(files: dict[str, dict[str, tuple]], names: dict[str, str], targets: dict[str, torch.Tensor],
                  directory: str, progress_bar: bool) -> None:
    """Every tensor of `files` copied into `targets` under our names (the
    fused matrices' row views and the stacked experts' slices among them), straight onto the device one
    tensor at a time (no host copy of the model), its progress logged."""
    device = next(iter(targets.values())).device
    sizes = {file: os.path.getsize(file) for file in files}
    total_gb = sum(sizes.values()) / 1e9
    tensors = sum(len(t) for t in files.values())
    logger.info("loading %s: %d file(s), %d tensors, %.2f GB to %s", directory, len(files), tensors, total_gb,
                device, extra={"files": len(files), "gigabytes": round(total_gb, 3)})
    bar = _progress_bar(sum(sizes.values())) if progress_bar else None
    started = time.perf_counter()
    read_gb = 0.0
    for i, (file, tensor_shapes) in enumerate(files.items(), 1):
        with _open_safetensors(file, device=str(device)) as f, torch.no_grad():
            for name in tensor_shapes:
                tensor = f.get_tensor(name)
                targets[names[name]].copy_(tensor)  # casts to the model dtype
                if bar is not None:
                    bar.update(tensor.numel() * tensor.element_size())
        read_gb += sizes[file] / 1e9
        if bar is None:
            logger.info("read %s (%d of %d): %d tensors, %.2f of %.2f GB in %.1f s", os.path.basename(file), i,
                        len(files), len(tensor_shapes), read_gb, total_gb, time.perf_counter() - started)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    logger.info("loaded %d tensors, %.2f GB in %.1f s (%.2f GB/s)", tensors, total_gb, seconds,
                total_gb / max(seconds, 1e-9), extra={"tensors": tensors, "seconds": round(seconds, 3)})


def _progress_bar(total_bytes: int):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights",
                file=sys.stderr, dynamic_ncols=True)


def _special_id(name: str, hf_config: dict, tokenizer_id: int | None, defaults: dict, config_path: str):
    """-> (id, source) from config.json, else the tokenizer, else the family's default."""
    value = hf_config.get(name)
    if isinstance(value, list):  # some configs list several EOS ids; the first is the end of text
        value = value[0]
    if value is not None:
        return value, "config.json"
    if tokenizer_id is not None:
        return tokenizer_id, "the tokenizer"
    if name in defaults:
        return defaults[name], "the family's default"
    what = name.removesuffix("_token_id")
    raise ValueError(f"{config_path}: no {name} and the tokenizer names no {what} token")


def _special_ids(hf_config: dict, tokenizer: Tokenizer, config_path: str, vocab_size: int,
                 defaults: dict | None = None) -> dict:
    """Mask and EOS from config.json (the model's own record), falling back to
    the tokenizer, then to the family's `defaults` (LLaDA2's released config
    has neither); end-of-turn (<|eot_id|>, <|im_end|>, <|role_end|>) from the tokenizer."""
    defaults = defaults or {}
    mask, mask_source = _special_id("mask_token_id", hf_config, tokenizer.mask_token_id, defaults, config_path)
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id != mask:
        raise ValueError(f"{config_path}: mask_token_id {mask} but the tokenizer's mask token "
                         f"is id {tokenizer.mask_token_id}")
    eos, eos_source = _special_id("eos_token_id", hf_config, tokenizer.eos_token_id, defaults, config_path)
    if defaults:
        logger.info("%s: mask token id %d from %s, EOS id %d from %s",
                    config_path, mask, mask_source, eos, eos_source)
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
        with _open_safetensors(p) as f:
            files[p] = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    return files


def _open_safetensors(path: str, device: str = "cpu"):
    """safe_open; a file it cannot parse is a ValueError naming the file
    (permanent), while an I/O error stays an OSError (maybe transient)."""
    try:
        return safe_open(path, framework="pt", device=device)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file: {e}") from None


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
