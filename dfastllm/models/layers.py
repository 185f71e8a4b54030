"""The transformer both model families share: a bidirectional Llama-style
stack (RMSNorm, half-split RoPE, grouped-query attention, SwiGLU) that returns
hidden states before the final norm, with `head` turning only the rows the
caller asks for into logits, so the engine never builds [B, L, V].

The stack runs over packed tokens [N, d_model]; which token attends to
which is the `attention` object's business: the engine's ragged batch over
the paged KV cache (`attention.py`), or a dense [B, T] batch with a mask
(`forward`, for training, tests and reference decoding).

A layer is two GEMMs on fused weights (q|k|v, gate|up), two more (wo, down),
the attention and three of our kernels (dfastllm.ops): the residual add with
the norm after it, RoPE with the K/V write (inside the attention object) and
SiLU x up. Training and autocast take the kernels' plain-torch references
(`plain_torch`).

What differs between families (RoPE precision, q/k/v biases, the logits
shift, checkpoint names and config fields) is stated in their own files,
`llada.py` and `dream.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfastllm import ops
from dfastllm.models.attention import Heads, rope_write_kv, write_kv
from dfastllm.ops.reference import add_rms_norm_reference, silu_mul_reference


def expand_checkpoint_names(table: dict[str, str], n_layers: int) -> dict[str, str]:
    """A `{checkpoint name: our name}` table with `{i}` patterns expanded per layer."""
    names = {}
    for ckpt, ours in table.items():
        for i in (range(n_layers) if "{i}" in ckpt else [None]):
            names[ckpt.format(i=i)] = ours.format(i=i)
    return names


def plain_torch(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call takes the kernels' plain-torch references: training
    (autograd through the weights) and autocast (mixed dtypes), as
    tools/train_tiny.py runs the model. Inference takes the kernels."""
    return (torch.is_grad_enabled() and weight.requires_grad) or torch.is_autocast_enabled(x.device.type)


class HFConfigNames:
    """The names every model config exposes (see dfastllm.models), for a
    config dataclass that keeps the Hugging Face field names."""

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

    def check_kv_heads(self) -> None:
        """Grouped-query attention needs the query heads to split evenly over the K/V heads."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")


class RMSNorm(nn.Module):
    """Normalises in fp32 and multiplies by the weight after casting back, as
    both reference implementations do; fused with the residual add before it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(h), h) with h = x + residual (x without one)."""
        norm = add_rms_norm_reference if plain_torch(x, self.weight) else ops.add_rms_norm
        return norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config, qkv_bias: bool, rope_in_fp32: bool):
        super().__init__()
        c = config
        self.heads = Heads(c.n_heads, c.n_kv_heads, c.head_dim, rope_in_fp32)
        q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        # q|k|v in one matrix: one GEMM reads the layer's input once.
        self.wqkv = nn.Linear(c.d_model, q_rows + 2 * kv_rows, bias=qkv_bias)
        self.wo = nn.Linear(q_rows, c.d_model, bias=False)
        self.fused_parts = {"wqkv": (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows))}

    def forward(self, x, cos, sin, attention, layer: int):
        """x [N, d_model] packed tokens, cos/sin fp32 [N, D/2] their RoPE angles;
        `attention(layer, qkv, cos, sin, heads)` rotates q and k, writes the
        cache if there is one and attends (`RaggedAttention` or `DenseAttention`)."""
        y = attention(layer, self.wqkv(x), cos, sin, self.heads,
                      plain_torch=plain_torch(x, self.wqkv.weight))               # [N, H, D]
        return self.wo(y.reshape(x.shape[0], -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        # gate|up in one matrix: one GEMM reads the layer's input once.
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.fused_parts = {"w_gate_up": (("w_gate", hidden), ("w_up", hidden))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        silu_mul = silu_mul_reference if plain_torch(x, self.w_gate_up.weight) else ops.silu_mul
        return self.w_down(silu_mul(self.w_gate_up(x)))


class Block(nn.Module):
    """Pre-norm attention and MLP; `attn(h, cos, sin, attention, layer)` and
    `mlp(h)` are the family's (LLaDA2 brings its own attention and MoE)."""

    def __init__(self, config, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, residual, cos, sin, attention, layer: int):
        """x: the block before's MLP output, not yet added to the residual
        stream (block 0: the embedding, residual None); each add is fused
        into the norm after it. -> (this block's MLP output, the stream)."""
        h, residual = self.attn_norm(x, residual)
        h, residual = self.mlp_norm(self.attn(h, cos, sin, attention, layer), residual)
        return self.mlp(h), residual


class DiffusionTransformer(nn.Module):
    """The stack; a family subclass sets the class attributes below."""

    logits_shift = 0          # logits of position i come from hidden state i - logits_shift
    qkv_bias = False
    rope_in_fp32 = True       # rotate in fp32 (LLaDA) or in the model dtype (Qwen2/Dream)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(self.block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def block(self, config, i: int) -> nn.Module:
        """Layer i (a family whose layers differ builds its own)."""
        return Block(config, Attention(config, self.qkv_bias, self.rope_in_fp32),
                     SwiGLU(config.d_model, config.mlp_hidden))

    @property
    def rope_dims(self) -> int:
        """How many of a head's dims RoPE rotates (all of them here)."""
        return self.config.head_dim

    def forward(self, input_ids, position_ids, attn_mask=None, kv_cache=None, cache_positions=None):
        """A dense batch (training, the model tests, reference decoding):
        input_ids, position_ids [B, T]; attn_mask [B, 1, T, S] bool (True = may
        attend) or None; with kv_cache, new K/V go to cache_positions [B, T] and
        S is the cache length. Returns unshifted hidden states [B, T, D] before the norm.
        The engine runs `forward_packed` instead (a ragged batch, no mask)."""
        if (kv_cache is None) != (cache_positions is None):
            raise ValueError("kv_cache and cache_positions go together")
        B, T = input_ids.shape
        attention = DenseAttention(B, T, grouped_mask(attn_mask, self.config.n_heads // self.config.n_kv_heads),
                                   kv_cache, cache_positions)
        return self.forward_packed(input_ids.reshape(-1), position_ids.reshape(-1), attention).view(B, T, -1)

    def forward_packed(self, input_ids, position_ids, attention):
        """input_ids, position_ids [N]: the tokens of every row packed together;
        `attention` says which tokens attend to which (a `RaggedAttention`
        over `AttentionMetadata`). Returns unshifted hidden states [N, D] before the norm."""
        x = self.embed(input_ids)                                                # [N, D]
        cos, sin = rope_cos_sin(position_ids, self.rope_dims, self.config.rope_theta)  # [N, rope_dims/2] fp32
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, attention, i)
        return x + residual

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., vocab_size] (final norm + output head)."""
        return self.output(self.norm(hidden)[0])

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every position [B, T, V], shifted as the family's reference
        does (Dream: position i from hidden i - 1, position 0 from hidden 0).
        For tests and reference decoding; the engine uses `head` on the rows it needs."""
        logits = self.head(hidden)
        if self.logits_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def checkpoint_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter under the name a checkpoint's tensor maps to (the
        families' name tables): the fused q|k|v and gate|up matrices appear as
        their parts (`attn.wq.weight`, ..., `mlp.w_up.weight`), each a view of
        its rows, so the loader fills them in place and an exporter reads them."""
        views, fused_linears = {}, set()
        for prefix, module in self.named_modules():
            for fused, parts in getattr(module, "fused_parts", {}).items():
                linear = getattr(module, fused)
                fused_linears.add(linear)
                for kind, tensor in linear.named_parameters():
                    views |= zip((f"{prefix}.{part}.{kind}" for part, _ in parts),
                                 tensor.split([rows for _, rows in parts]))
        for prefix, module in self.named_modules():
            if module not in fused_linears:
                views |= {f"{prefix}.{n}".lstrip("."): p for n, p in module.named_parameters(recurse=False)}
        return views


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin fp32 [..., head_dim / 2] for position_ids [...]: the angle of the
    pair (j, j + head_dim / 2). Each family's precision of the rotation itself
    is the kernel's (`Heads.rope_in_fp32`)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq                          # [..., D/2]
    return freqs.cos(), freqs.sin()


class DenseAttention:
    """The dense batch's attention (`forward`): rows of T tokens, keys masked
    by attn_mask [B, 1, G*T, S] (from `grouped_mask`), optionally through a
    dense `KVCache` [B, Hkv, S, D] written at cache_positions [B, T]: to the
    RoPE kernel, pages of S slots, one per row (without a cache, of T)."""

    def __init__(self, batch: int, length: int, attn_mask, kv_cache=None, cache_positions=None):
        self.batch, self.length = batch, length
        self.attn_mask, self.kv_cache, self.cache_positions = attn_mask, kv_cache, cache_positions
        self._slots = None  # [B, T] each token's slot: row b's page b at its position

    def __call__(self, layer: int, qkv, cos, sin, heads: Heads, *, plain_torch: bool = False):
        B, T = self.batch, self.length
        k, v = self._cache(layer, qkv, heads.n_kv_heads, heads.head_dim)         # [B, Hkv, S, D]
        # q heads-first, so grouped_sdpa folds the grouped heads without a copy.
        q = qkv.new_empty(B, heads.n_heads, T, heads.head_dim)                    # [B, H, T, D]
        rope_write_kv(qkv.view(B, T, -1), cos.view(B, T, -1), sin.view(B, T, -1), k.transpose(1, 2),
                      v.transpose(1, 2), self._token_slots(k), heads, plain_torch=plain_torch,
                      q_out=q.transpose(1, 2))
        return self._attend(q, k, v)

    def attend_rotated(self, layer: int, q, k, v):
        """For a model that normalises and rotates q and k itself (LLaDA2):
        q [B*T, H, D], k, v [B*T, Hkv, D] -> [B*T, H, D]."""
        B, T = self.batch, self.length
        k_cache, v_cache = self._cache(layer, q, k.shape[1], k.shape[2])
        write_kv(k_cache.transpose(1, 2), v_cache.transpose(1, 2), self._token_slots(k_cache), k, v)
        return self._attend(q.view(B, T, *q.shape[1:]).transpose(1, 2), k_cache, v_cache)

    def _cache(self, layer: int, like, n_kv_heads: int, head_dim: int):
        """The layer's (k, v) [B, Hkv, S, D]: the dense cache, or without one this step's T positions."""
        if self.kv_cache is None:
            B, T = self.batch, self.length
            return (like.new_empty(B, n_kv_heads, T, head_dim), like.new_empty(B, n_kv_heads, T, head_dim))
        return self.kv_cache.k[layer], self.kv_cache.v[layer]

    def _token_slots(self, k):
        """[B, T] each token's slot in the cache seen as pages of S slots, row b's page b at its position."""
        if self._slots is None:
            rows = k.shape[2] * torch.arange(self.batch, device=k.device)[:, None]
            positions = (torch.arange(self.length, device=k.device) if self.cache_positions is None
                         else self.cache_positions)
            self._slots = (rows + positions).contiguous()
        return self._slots

    def _attend(self, q, k, v):
        """q [B, H, T, D] over k, v [B, Hkv, S, D] -> [B*T, H, D]."""
        y = grouped_sdpa(q, k, v, self.attn_mask)                                  # [B, H, T, D]
        return y.transpose(1, 2).reshape(self.batch * self.length, y.shape[1], y.shape[-1])


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
