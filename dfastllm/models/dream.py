"""Dream (Dream-org/Dream-v0-*-7B): a bidirectional Qwen2 transformer.

Follows the reference `modeling_dream.py` numerics: RMSNorm in fp32 with the
weight applied after casting back, half-split RoPE with cos/sin computed in
fp32 and cast to the model dtype before rotating (Qwen2 does the rotation in
bf16, unlike LLaDA), grouped-query attention (28 query / 4 K/V heads),
biases on q, k and v only, SwiGLU MLP, untied head.

The layers are shared with LLaDA (`layers.py`); the two differ in the RoPE
precision, the biases, the names and the shift, which this file states.

Dream is trained to predict position i from hidden state i - 1
(`logits_shift = 1`); `forward` still returns unshifted hidden states and
the engine picks row i - 1 for position i. `full_logits` applies the shift
the way the reference does, for tests and reference decoding.
"""

from __future__ import annotations

import dataclasses

from dfastllm.models.layers import DiffusionTransformer, HFConfigNames, expand_checkpoint_names


@dataclasses.dataclass
class DreamConfig(HFConfigNames):
    # Field names as the checkpoint's config.json spells them (Qwen2).
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 131072
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    mask_token_id: int = 151666
    eos_token_id: int = 151643
    pad_token_id: int = 151643

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        self.check_kv_heads()
        self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def mlp_hidden(self) -> int:
        return self.intermediate_size

    @classmethod
    def from_hf_config(cls, hf: dict) -> DreamConfig:
        if hf.get("tie_word_embeddings"):
            raise ValueError("Dream config field tie_word_embeddings=True is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Dream config field hidden_act={hf['hidden_act']!r} is not supported")
        if hf.get("rope_scaling") or hf.get("use_sliding_window"):
            raise ValueError("Dream config fields rope_scaling / use_sliding_window are not supported")
        return cls(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            rope_theta=float(hf.get("rope_theta", 1e6)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mask_token_id=hf.get("mask_token_id", 151666),
            eos_token_id=hf.get("eos_token_id", 151643),
            pad_token_id=hf.get("pad_token_id", hf.get("eos_token_id", 151643)),
        )


# Checkpoint tensor name -> this module's parameter name ({i} = layer index).
# wq/wk/wv and w_gate/w_up name row ranges of the fused wqkv and w_gate_up
# matrices (`DiffusionTransformer.checkpoint_parameters`).
CHECKPOINT_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.wq.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.wk.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.wv.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.w_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.w_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.w_down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def checkpoint_names(config: DreamConfig) -> dict[str, str]:
    """Every checkpoint tensor name of this config, mapped to ours."""
    return expand_checkpoint_names(CHECKPOINT_NAMES, config.num_hidden_layers)


class DreamModel(DiffusionTransformer):
    logits_shift = 1      # logits of position i come from hidden state i - 1
    qkv_bias = True       # biases on q, k and v only
    rope_in_fp32 = False  # Qwen2 casts cos/sin to the model dtype and rotates there
