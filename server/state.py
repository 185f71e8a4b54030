"""What every resource of a worker shares: the configuration, the engine
client, the tokenizer, the served model and the metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from dfastllm.checkpoints import CONFIG_FILES, DEFAULT_MODEL_DIR, MODEL_FAMILIES, resolve_checkpoint
from dfastllm.config import ServerConfig
from server.metrics import HttpMetrics
from server.schemas import Limits


def checkpoint_dir(model: str | None) -> str:
    """The local directory of the configured model: the embedded default, a
    directory, or a hub id (only its small JSON/template files are fetched
    here; the engine downloads the weights)."""
    return resolve_checkpoint(model or DEFAULT_MODEL_DIR, files=CONFIG_FILES)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    name: str  # what clients send as `model`
    path: str  # the checkpoint directory
    max_model_len: int  # prompt + max_tokens limit
    family: str = "llada"  # which decoding algorithms apply (sampling_params.py)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_checkpoint(cls, config: ServerConfig, path: str) -> ServedModel:
        """The model card of a checkpoint directory: its `config.json` gives
        the longest sequence unless the configuration sets a shorter one."""
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            hf_config = json.load(f)
        model_len = hf_config.get("max_sequence_length") or hf_config.get("max_position_embeddings")
        if config.max_model_len is not None:
            model_len = min(config.max_model_len, model_len or config.max_model_len)
        if not model_len:
            raise ValueError(f"{path}/config.json names no maximum sequence length; set --max-model-len")
        name = config.served_model_name or os.path.basename(os.path.normpath(path))
        family = MODEL_FAMILIES.get(hf_config.get("model_type"), "llada")  # the engine refuses unknown types
        return cls(name=name, path=path, max_model_len=int(model_len), family=family)


@dataclasses.dataclass
class ServerState:
    config: ServerConfig  # replaced as a whole when runtime settings change
    engine: object  # EngineClient or InProcessEngineClient
    tokenizer: object  # dfastllm.tokenizer.Tokenizer
    model: ServedModel
    metrics: HttpMetrics

    def limits(self) -> Limits:
        return Limits(model=self.model.name, max_prompt_chars=self.config.max_prompt_chars,
                      max_messages=self.config.max_messages, default_max_tokens=self.config.default_max_tokens,
                      vocab_size=self.tokenizer.vocab_size)
