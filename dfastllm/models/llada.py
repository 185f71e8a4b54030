"""LLaDA (GSAI-ML/LLaDA-8B-*): a bidirectional Llama-style transformer.

Follows the reference `modeling_llada.py` numerics: RMSNorm in fp32 with the
weight applied after casting back, half-split RoPE computed *and applied* in
fp32 (`rope_full_precision`), SwiGLU MLP, no biases, untied output head.
The model returns hidden states before the final norm; `head` turns only the
rows the caller asks for into logits, so the engine never builds [B, L, V].
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


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
    names = {}
    for ckpt, ours in CHECKPOINT_NAMES.items():
        layers = range(config.n_layers) if "{i}" in ckpt else [None]
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
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
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
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden_size)

    def forward(self, x, cos, sin, attn_mask, cache_kv=None, cache_positions=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache_kv, cache_positions)
        return h + self.mlp(self.mlp_norm(h))


class LLaDAModel(nn.Module):
    logits_shift = 0  # logits of position i come from hidden state i

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids, position_ids, attn_mask=None, kv_cache=None, cache_positions=None):
        """input_ids, position_ids [B, T]; attn_mask [B, 1, T, S] bool (True = may
        attend) or None; with kv_cache, new K/V go to cache_positions [B, T] and
        S is the cache length. Returns hidden states [B, T, D] before the norm."""
        if (kv_cache is None) != (cache_positions is None):
            raise ValueError("kv_cache and cache_positions go together")
        x = self.embed(input_ids)                                                # [B, T, D]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        for i, layer in enumerate(self.layers):
            cache_kv = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            x = layer(x, cos, sin, attn_mask, cache_kv, cache_positions)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., vocab_size] (final norm + output head)."""
        return self.output(self.norm(hidden))

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every position [B, T, V] (no shift in LLaDA); for tests and
        reference decoding, the engine uses `head` on the rows it needs."""
        return self.head(hidden)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """fp32 cos/sin [B, 1, T, head_dim] for each row's own positions."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq                          # [B, T, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]                         # [B, 1, T, D]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # LLaDA rotates in fp32 (rope_full_precision) and casts back.
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


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
