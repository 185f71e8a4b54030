"""Dream (Dream-org/Dream-v0-*-7B): a bidirectional Qwen2 transformer.

Follows the reference `modeling_dream.py` numerics: RMSNorm in fp32 with the
weight applied after casting back, half-split RoPE with cos/sin computed in
fp32 and cast to the model dtype before rotating (Qwen2 does the rotation in
bf16, unlike LLaDA), grouped-query attention (28 query / 4 K/V heads),
biases on q, k and v only, SwiGLU MLP, untied head.

The layers mirror `llada.py` on purpose, one readable file per family: the
two differ in the RoPE precision, the biases, the names and the shift.

Dream is trained to predict position i from hidden state i - 1
(`logits_shift = 1`); `forward` still returns unshifted hidden states and
the engine picks row i - 1 for position i. `full_logits` applies the shift
the way the reference does, for tests and reference decoding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class DreamConfig:
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
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads

    # The names every model config exposes (see dfastllm.models).
    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def max_seq_len(self) -> int:
        return self.max_position_embeddings

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
    names = {}
    for ckpt, ours in CHECKPOINT_NAMES.items():
        layers = range(config.num_hidden_layers) if "{i}" in ckpt else [None]
        for i in layers:
            names[ckpt.format(i=i)] = ours.format(i=i)
    return names


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=True)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=True)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=True)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache_kv=None, cache_positions=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, T, D]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_kv is not None:
            k, v = write_cache(cache_kv, cache_positions, k, v)                    # [B, Hkv, S, D]
        y = grouped_sdpa(q, k, v, attn_mask)                                       # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = SwiGLU(config.d_model, config.intermediate_size)

    def forward(self, x, cos, sin, attn_mask, cache_kv=None, cache_positions=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache_kv, cache_positions)
        return h + self.mlp(self.mlp_norm(h))


class DreamModel(nn.Module):
    logits_shift = 1  # logits of position i come from hidden state i - 1

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids, position_ids, attn_mask=None, kv_cache=None, cache_positions=None):
        """input_ids, position_ids [B, T]; attn_mask [B, 1, T, S] bool (True = may
        attend) or None; with kv_cache, new K/V go to cache_positions [B, T] and
        S is the cache length. Returns unshifted hidden states [B, T, D] before the norm."""
        if (kv_cache is None) != (cache_positions is None):
            raise ValueError("kv_cache and cache_positions go together")
        x = self.embed(input_ids)                                                # [B, T, D]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            cache_kv = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            x = layer(x, cos, sin, attn_mask, cache_kv, cache_positions)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., vocab_size] (final norm + output head)."""
        return self.output(self.norm(hidden))

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every position [B, T, V], shifted as the reference does:
        position i from hidden i - 1, position 0 from hidden 0."""
        logits = self.head(hidden)
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, head_dim] for each row's own positions, computed in
    fp32 and cast to the model dtype (as Qwen2's rotary embedding returns them)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq                          # [B, T, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]                         # [B, 1, T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def write_cache(cache_kv, cache_positions, k, v):
    """Scatter k, v [B, Hkv, T, D] into the cache [B, Hkv, S, D] at
    cache_positions [B, T] (in place) and return the whole cache views."""
    k_cache, v_cache = cache_kv
    B, Hkv, T, D = k.shape
    index = cache_positions[:, None, :, None].expand(B, Hkv, T, D)
    k_cache.scatter_(2, index, k)
    v_cache.scatter_(2, index, v)
    return k_cache, v_cache


def grouped_sdpa(q, k, v, attn_mask):
    """Bidirectional SDPA with grouped-query heads: q [B, H, T, D], k/v [B, Hkv, S, D],
    attn_mask [B, 1, T, S] bool or None -> [B, H, T, D].

    The query heads sharing one K/V head are folded into the query length
    instead of repeating K/V (no copy of a long cache; works with every SDPA
    backend that accepts a mask, unlike `enable_gqa`)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    q = q.reshape(B, Hkv, group * T, D)             # head h = kv head h // group
    if attn_mask is not None:
        attn_mask = attn_mask.repeat(1, 1, group, 1)                            # [B, 1, G*T, S]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)           # [B, Hkv, G*T, D]
    return y.reshape(B, H, T, D)
