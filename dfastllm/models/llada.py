"""LLaDA (GSAI-ML/LLaDA-8B-*): a bidirectional Llama-style transformer.

Follows the reference `modeling_llada.py` numerics: RMSNorm in fp32 with the
weight applied after casting back, half-split RoPE computed *and applied* in
fp32 (`rope_full_precision`), SwiGLU MLP, no biases, untied output head.
The layers are shared with Dream (`layers.py`); this file holds what is
LLaDA's own: the config, the checkpoint names and the numerics flags.
"""

from __future__ import annotations

import dataclasses

from dfastllm.models.layers import DiffusionTransformer, expand_checkpoint_names


# Options of the OLMo-derived config that LLaDA fixes and this module
# implements only with these values (an absent field is fine).
LLADA_FIXED_FIELDS = {
    "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
    "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
    "scale_logits": False, "attention_layer_norm": False, "input_emb_norm": False,
    "rope": True, "rope_full_precision": True, "alibi": False,
}


@dataclasses.dataclass
class LLaDAConfig:
    # Field names as the checkpoint's config.json spells them.
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    # Rows of the embedding and the head (`embedding_size` in config.json,
    # which may pad the tokenizer's `vocab_size`).
    vocab_size: int
    max_sequence_length: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        self.head_dim = self.d_model // self.n_heads
        self.max_seq_len = self.max_sequence_length
        self.mlp_hidden = self.mlp_hidden_size

    @classmethod
    def from_hf_config(cls, hf: dict) -> LLaDAConfig:
        for field, value in LLADA_FIXED_FIELDS.items():
            if hf.get(field, value) != value:
                raise ValueError(f"LLaDA config field {field}={hf[field]!r} is not supported "
                                 f"(expected {value!r})")
        return cls(
            d_model=hf["d_model"],
            n_layers=hf["n_layers"],
            n_heads=hf["n_heads"],
            n_kv_heads=hf.get("n_kv_heads") or hf["n_heads"],
            mlp_hidden_size=hf["mlp_hidden_size"],
            vocab_size=hf.get("embedding_size") or hf["vocab_size"],
            max_sequence_length=hf.get("max_sequence_length", 4096),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            mask_token_id=hf.get("mask_token_id", 126336),
            eos_token_id=hf.get("eos_token_id", 126081),
            pad_token_id=hf.get("pad_token_id", hf.get("eos_token_id", 126081)),
        )


# Checkpoint tensor name -> this module's parameter name ({i} = layer index).
# wq/wk/wv and w_gate/w_up name row ranges of the fused wqkv and w_gate_up
# matrices (`DiffusionTransformer.checkpoint_parameters`).
CHECKPOINT_NAMES = {
    "model.transformer.wte.weight": "embed.weight",
    "model.transformer.blocks.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "model.transformer.blocks.{i}.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.transformer.blocks.{i}.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.transformer.blocks.{i}.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.transformer.blocks.{i}.attn_out.weight": "layers.{i}.attn.wo.weight",
    "model.transformer.blocks.{i}.ff_norm.weight": "layers.{i}.mlp_norm.weight",
    "model.transformer.blocks.{i}.ff_proj.weight": "layers.{i}.mlp.w_gate.weight",
    "model.transformer.blocks.{i}.up_proj.weight": "layers.{i}.mlp.w_up.weight",
    "model.transformer.blocks.{i}.ff_out.weight": "layers.{i}.mlp.w_down.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "output.weight",
}


def checkpoint_names(config: LLaDAConfig) -> dict[str, str]:
    """Every checkpoint tensor name of this config, mapped to ours."""
    return expand_checkpoint_names(CHECKPOINT_NAMES, config.n_layers)


class LLaDAModel(DiffusionTransformer):
    logits_shift = 0      # logits of position i come from hidden state i
    qkv_bias = False
    rope_in_fp32 = True   # rope_full_precision: rotate in fp32, cast back
