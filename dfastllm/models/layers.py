"""The transformer both model families share: a bidirectional Llama-style
stack (RMSNorm, half-split RoPE, grouped-query SDPA, SwiGLU) that returns
hidden states before the final norm, with `head` turning only the rows the
caller asks for into logits, so the engine never builds [B, L, V].

What differs between families (RoPE precision, q/k/v biases, the logits
shift, checkpoint names and config fields) is stated in their own files,
`llada.py` and `dream.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def expand_checkpoint_names(table: dict[str, str], n_layers: int) -> dict[str, str]:
    """A `{checkpoint name: our name}` table with `{i}` patterns expanded per layer."""
    names = {}
    for ckpt, ours in table.items():
        for i in (range(n_layers) if "{i}" in ckpt else [None]):
            names[ckpt.format(i=i)] = ours.format(i=i)
    return names


class RMSNorm(nn.Module):
    """Normalises in fp32 and multiplies by the weight after casting back, as
    both reference implementations do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=qkv_bias)
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
    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = Attention(config, qkv_bias)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x, cos, sin, attn_mask, cache_kv=None, cache_positions=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache_kv, cache_positions)
        return h + self.mlp(self.mlp_norm(h))


class DiffusionTransformer(nn.Module):
    """The stack; a family subclass sets the class attributes below."""

    logits_shift = 0          # logits of position i come from hidden state i - logits_shift
    qkv_bias = False
    rope_in_fp32 = True       # rotate in fp32 (LLaDA) or in the model dtype (Qwen2/Dream)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, self.qkv_bias) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids, position_ids, attn_mask=None, kv_cache=None, cache_positions=None):
        """input_ids, position_ids [B, T]; attn_mask [B, 1, T, S] bool (True = may
        attend) or None; with kv_cache, new K/V go to cache_positions [B, T] and
        S is the cache length. Returns unshifted hidden states [B, T, D] before the norm."""
        if (kv_cache is None) != (cache_positions is None):
            raise ValueError("kv_cache and cache_positions go together")
        x = self.embed(input_ids)                                                # [B, T, D]
        rope_dtype = torch.float32 if self.rope_in_fp32 else x.dtype
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, rope_dtype)
        attn_mask = grouped_mask(attn_mask, self.config.n_heads // self.config.n_kv_heads)
        for i, layer in enumerate(self.layers):
            cache_kv = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            x = layer(x, cos, sin, attn_mask, cache_kv, cache_positions)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., vocab_size] (final norm + output head)."""
        return self.output(self.norm(hidden))

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every position [B, T, V], shifted as the family's reference
        does (Dream: position i from hidden i - 1, position 0 from hidden 0).
        For tests and reference decoding; the engine uses `head` on the rows it needs."""
        logits = self.head(hidden)
        if self.logits_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, head_dim] for each row's own positions, computed in
    fp32 and returned in `dtype` (the precision the rotation runs in)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq                          # [B, T, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]                         # [B, 1, T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates in cos/sin's dtype and casts back to x's."""
    xr = x.to(cos.dtype)
    return (xr * cos + rotate_half(xr) * sin).to(x.dtype)


def write_cache(cache_kv, cache_positions, k, v):
    """Scatter k, v [B, Hkv, T, D] into the cache [B, Hkv, S, D] at
    cache_positions [B, T] (in place) and return the whole cache views."""
    k_cache, v_cache = cache_kv
    B, Hkv, T, D = k.shape
    index = cache_positions[:, None, :, None].expand(B, Hkv, T, D)
    k_cache.scatter_(2, index, k)
    v_cache.scatter_(2, index, v)
    return k_cache, v_cache


def grouped_mask(attn_mask, group: int):
    """[B, 1, T, S] -> [B, 1, group*T, S] for `grouped_sdpa`, built once per
    forward rather than in every layer."""
    if attn_mask is None or group == 1:
        return attn_mask
    return attn_mask.repeat(1, 1, group, 1)


def grouped_sdpa(q, k, v, attn_mask):
    """Bidirectional SDPA with grouped-query heads: q [B, H, T, D], k/v [B, Hkv, S, D],
    attn_mask [B, 1, G*T, S] bool (from `grouped_mask`) or None -> [B, H, T, D].

    The query heads sharing one K/V head are folded into the query length
    instead of repeating K/V (no copy of a long cache; works with every SDPA
    backend that accepts a mask, unlike `enable_gqa`)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, (H // Hkv) * T, D)        # head h = kv head h // group
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)           # [B, Hkv, G*T, D]
    return y.reshape(B, H, T, D)
