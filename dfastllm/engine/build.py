"""The one way to build an EngineCore from a ServerConfig: which checkpoint
(the embedded tiny model when none is named), on which device, in which
dtype, and the engine's settings (KV cache mode, batch budgets, model
length, seed, CUDA graphs). The engine process, the in-process client and
the offline `LLM` all build their engine here, so a setting means the same
everywhere.
"""

from __future__ import annotations

import os

import torch

from dfastllm.checkpoints import DEFAULT_MODEL_DIR
from dfastllm.config import ServerConfig
from dfastllm.engine.core import EngineCore
from dfastllm.models import LoadedModel, load_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is there, else "cpu"; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str) -> torch.dtype | None:
    """A dtype name -> the torch dtype; "auto" -> None (the loader's choice:
    bf16 on CUDA, fp32 on CPU)."""
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_served_model(config: ServerConfig, *, progress_bar: bool = False) -> LoadedModel:
    """The checkpoint `config.model` names (None: the embedded tiny model)
    on `config.device` in `config.dtype`, its projections in fp8 if `config.quantization` says so."""
    model = config.model
    if model is None:
        model = DEFAULT_MODEL_DIR
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"the embedded default model is missing ({model} has no config.json); "
                                    "name a checkpoint directory or hub id")
    return load_model(model, device=resolve_device(config.device), dtype=resolve_dtype(config.dtype),
                      quantization=None if config.quantization == "none" else config.quantization,
                      progress_bar=progress_bar)


def build_engine_core(config: ServerConfig, loaded: LoadedModel | None = None, *,
                      progress_bar: bool = False) -> EngineCore:
    """An EngineCore as `config` says, over `loaded` (already on its device)
    or over the model `config` names, loaded now."""
    if loaded is None:
        loaded = load_served_model(config, progress_bar=progress_bar)
    return EngineCore(loaded, kv_cache=config.kv_cache, max_batch_size=config.max_batch_size,
                      max_num_batched_tokens=config.max_num_batched_tokens,
                      kv_cache_memory=config.kv_cache_memory, max_model_len=config.max_model_len,
                      seed=config.seed, cuda_graphs=config.cuda_graphs, prefix_caching=config.prefix_caching)
