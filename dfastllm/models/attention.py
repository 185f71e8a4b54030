"""Attention over a ragged batch: the interface between the engine and a model forward.

A step packs the query tokens of every row into one token dimension
([N, H, D] after the projections, no padding between rows). Per row b:

* queries are tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1] of the pack;
* keys are the row's canvas positions [0, seqlens_k[b]). Without a cache
  (kv_cache none) they are the row's own packed tokens (a full row queries
  its whole canvas); with the paged cache they live in pages of
  `PagedKVCache`, found through the row's block table, and every query
  token first writes its own K/V at slot_mapping (page * page_size + offset).

A layer hands over its fused q|k|v projection [N, (H + 2 Hkv) * D] and the
tokens' RoPE angles; one `rope_write_kv` kernel rotates q and k and writes
k and v into the pages (without a cache: into one scratch page of this
step's N tokens), then the attention reads them. Training and autocast take
the kernel's plain-torch reference instead (`plain_torch`).

Attention is bidirectional within a row and never crosses rows. Three
implementations of the same contract:

* `flash`: torch's varlen flash attention (`torch.nn.attention.varlen`),
  on CUDA in fp16/bf16, reading pages through the block table when the
  page size suits the kernel (torch's FA2 wants multiples of 256), else
  over the rows' keys gathered into one packed tensor;
* `grouped`: scaled_dot_product_attention per group of rows with the same
  (query, key) lengths (in steady state all rows form one group), over keys
  gathered from the pages (K and V in one gather): its cost follows the
  real tokens. A group of consecutive rows reads its queries (and, without
  a cache, its keys) in place and, when it is the whole pack, is the output
  with no copy: one SDPA call with grouped heads. The CPU's, and CUDA's in fp32;
* `ragged_attention_reference`: plain torch, one row and one head at a
  time, for the parity tests.

`AttentionMetadata` is built by the engine (`engine/batch.py`); a model
forward takes it inside a `RaggedAttention`, whose call does the RoPE, the
K/V write and the attention of one layer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import numpy as np
import torch
import torch.nn.functional as F

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # an older torch: the grouped SDPA path everywhere
    varlen_attn = None

from dfastllm import ops
from dfastllm.ops.reference import rope_write_kv_reference

# torch's FA2 reads paged K/V only for pages of a multiple of this many tokens.
FLASH_PAGE_MULTIPLE = 256


@dataclasses.dataclass
class PagedKVCache:
    """K/V pages of every layer: kv[layer] is [2, num_pages, page_size, Hkv, D],
    K then V, so k[layer], v[layer] are [num_pages, page_size, Hkv, D] (the
    layout flash attention's block table addresses) and one gather reads a
    row's K and V. Allocated once by the engine (`engine/kv_cache.py`);
    models only write and read through `RaggedAttention`."""
    kv: list[torch.Tensor]

    @property
    def k(self) -> list[torch.Tensor]:
        return [layer[0] for layer in self.kv]

    @property
    def v(self) -> list[torch.Tensor]:
        return [layer[1] for layer in self.kv]

    @property
    def page_size(self) -> int:
        return self.kv[0].shape[2]


@dataclasses.dataclass
class AttentionMetadata:
    """Where each row's queries and keys are, for one ragged forward of B rows over N tokens."""
    cu_seqlens_q: torch.Tensor  # [B+1] int32, row b's queries are pack tokens [cu[b], cu[b+1])
    cu_seqlens_k: torch.Tensor  # [B+1] int32, offsets of the rows' keys packed row after row
    seqlens_k: torch.Tensor  # [B] int32, row b attends to its canvas positions [0, seqlens_k[b])
    max_seqlen_q: int  # upper bounds over the rows (a captured graph uses its bucket's)
    max_seqlen_k: int
    block_tables: torch.Tensor | None = None  # [B, max_pages] int32 page ids (paged cache)
    # [N] int64 contiguous: the slot each query token's K/V goes to, in the pool (paged), else in a
    # scratch page of the step's own tokens (token i -> slot i).
    slot_mapping: torch.Tensor | None = None
    page_size: int = 0  # tokens per page (paged cache)
    # Host copies for the grouped implementation: per row its query and key lengths and pages.
    host_seqlens_q: list[int] = dataclasses.field(default_factory=list)
    host_seqlens_k: list[int] = dataclasses.field(default_factory=list)
    host_pages: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def paged(self) -> bool:
        return self.block_tables is not None


@functools.cache
def _varlen_params() -> frozenset[str]:
    """The keyword arguments the installed torch's varlen_attn takes (they grew across releases)."""
    return frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else frozenset()


def flash_usable(dtype: torch.dtype, device: torch.device, head_dim: int, grouped: bool) -> bool:
    """Whether torch's varlen flash attention can run these shapes here
    (grouped: fewer K/V heads than query heads)."""
    return (varlen_attn is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256 and (not grouped or "enable_gqa" in _varlen_params()))


def flash_reads_pages(page_size: int) -> bool:
    """Whether the flash kernel reads the pages in place (else keys are gathered first)."""
    return {"block_table", "seqused_k"} <= _varlen_params() and page_size % FLASH_PAGE_MULTIPLE == 0


@dataclasses.dataclass(frozen=True)
class Heads:
    """How a layer's fused projection splits and rotates: q|k|v rows of
    n_heads, n_kv_heads, n_kv_heads heads of head_dim; RoPE in fp32 and
    rounded once (LLaDA) or in the model dtype (Qwen2/Dream)."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_in_fp32: bool


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pages: torch.Tensor,
                  v_pages: torch.Tensor, slot_mapping: torch.Tensor, heads: Heads, *, plain_torch: bool,
                  q_out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on q and k of qkv [B, T, (H + 2 Hkv) * D] (angles cos, sin fp32
    [B, T, D/2]) and k, v written into the pages [P, S, Hkv, D] at
    slot_mapping [B, T]: the `dfastllm.ops.rope_write_kv` kernel, or its
    plain-torch reference (plain_torch). -> q [B, T, H, D] (q_out when given)."""
    if plain_torch:
        q = rope_write_kv_reference(qkv, cos, sin, k_pages, v_pages, slot_mapping, n_heads=heads.n_heads,
                                    rotate_in_fp32=heads.rope_in_fp32)
        return q if q_out is None else q_out.copy_(q)
    return ops.rope_write_kv(qkv, cos, sin, k_pages, v_pages, slot_mapping, n_heads=heads.n_heads,
                             rotate_in_fp32=heads.rope_in_fp32, q_out=q_out)


class RaggedAttention:
    """One forward's attention: called per layer with that layer's packed
    q|k|v projection [N, (H + 2 Hkv) * D] and RoPE angles cos, sin fp32
    [N, D/2] -> [N, H, D]."""

    def __init__(self, metadata: AttentionMetadata, cache: PagedKVCache | None = None):
        if metadata.paged != (cache is not None):
            raise ValueError("a paged cache and block tables go together")
        if metadata.slot_mapping is None:
            raise ValueError("the metadata needs a slot_mapping (without a cache: token i -> slot i)")
        self.meta = metadata
        self.cache = cache
        self._groups = None  # the grouped implementation's row groups, built at the first layer
        self._key_slots = None  # the flash implementation's gathered keys' slots (pages it cannot read)

    def __call__(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: Heads, *,
                 plain_torch: bool = False) -> torch.Tensor:
        kv = self._pages(layer, qkv, heads.n_kv_heads, heads.head_dim)
        q = rope_write_kv(qkv[None], cos[None], sin[None], kv[0], kv[1], self.meta.slot_mapping[None], heads,
                          plain_torch=plain_torch)[0]                          # [N, H, D]
        return self._attend(q, kv)

    def attend_rotated(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """For a model that normalises and rotates q and k itself (LLaDA2: QK-norm,
        partial RoPE): q [N, H, D], k, v [N, Hkv, D]; k and v are written at
        slot_mapping, then the same attention as `__call__`. -> [N, H, D]."""
        kv = self._pages(layer, q, k.shape[1], k.shape[2])
        write_kv(kv[0], kv[1], self.meta.slot_mapping, k, v)
        return self._attend(q, kv)

    def _pages(self, layer: int, like: torch.Tensor, n_kv_heads: int, head_dim: int) -> torch.Tensor:
        """[2, P, page_size, Hkv, D]: the layer's pages, or without a cache one
        scratch page of the step's N tokens."""
        if self.cache is not None:
            return self.cache.kv[layer]
        return like.new_empty(2, 1, like.shape[0], n_kv_heads, head_dim)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q [N, H, D] over the K/V already in kv (`_pages`) -> [N, H, D]."""
        meta = self.meta
        grouped_heads = q.shape[1] != kv.shape[-2]
        if flash_usable(q.dtype, q.device, q.shape[-1], grouped_heads):
            if self.cache is None:
                return _flash(q, kv[0, 0], kv[1, 0], None, None, meta)
            if not flash_reads_pages(meta.page_size) and self._key_slots is None:
                slots = [_row_slots(p, n, meta.page_size) for p, n in zip(meta.host_pages, meta.host_seqlens_k)]
                self._key_slots = torch.from_numpy(np.concatenate(slots)).to(q.device, non_blocking=True)
            return _flash(q, None, None, kv[0], kv[1], meta, self._key_slots)
        if self._groups is None:
            self._groups = _row_groups(meta, q.device)
        return _grouped(q, kv, self._groups)


def write_kv(k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k, v [..., Hkv, D] written into the pages [P, S, Hkv, D] (views of any
    strides) at slot_mapping [...] (page * S + offset): the K/V half of
    `rope_write_kv`, for K/V rotated by the model itself."""
    slots = slot_mapping.reshape(-1)
    page, offset = slots // k_pages.shape[1], slots % k_pages.shape[1]
    k_pages[page, offset] = k.reshape(-1, *k.shape[-2:])
    v_pages[page, offset] = v.reshape(-1, *v.shape[-2:])


# ---- flash (CUDA) -------------------------------------------------------------
def _flash(q, k, v, k_pages, v_pages, meta: AttentionMetadata, key_slots=None) -> torch.Tensor:
    """k, v [N, Hkv, D] without a cache, else k_pages, v_pages."""
    common = {}
    if q.shape[1] != (k if k_pages is None else k_pages).shape[-2]:
        common["enable_gqa"] = True
    if "num_splits" in _varlen_params():
        common["num_splits"] = 1  # a row's result must not depend on the rest of the batch
    if k_pages is None:  # no cache: each row attends to its own packed tokens
        return varlen_attn(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
                           **common)
    if flash_reads_pages(k_pages.shape[1]):
        return varlen_attn(q, k_pages, v_pages, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                           meta.max_seqlen_k, seqused_k=meta.seqlens_k, block_table=meta.block_tables, **common)
    # Pages the kernel cannot read in place: gather each row's keys (key_slots) into one pack first.
    keys = k_pages.view(-1, *k_pages.shape[2:]).index_select(0, key_slots)
    values = v_pages.view(-1, *v_pages.shape[2:]).index_select(0, key_slots)
    return varlen_attn(q, keys, values, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
                       **common)


def _row_slots(pages: list[int], n: int, page_size: int) -> np.ndarray:
    """Pool slots of a row's canvas positions [0, n) given its pages."""
    positions = np.arange(n, dtype=np.int64)
    return np.asarray(pages, dtype=np.int64)[positions // page_size] * page_size + positions % page_size


# ---- grouped SDPA (CPU, and CUDA in fp32) ------------------------------------
@dataclasses.dataclass
class _Group:
    rows: int
    q_len: int
    k_len: int
    q_index: torch.Tensor  # [rows * q_len] pack tokens of the rows' queries, row after row
    k_index: torch.Tensor  # [rows * k_len] their keys: pool slots (paged) or pack tokens
    q_start: int | None  # the queries are pack tokens [q_start, q_start + rows * q_len) (consecutive rows)
    k_start: int | None  # the keys are slots [k_start, k_start + rows * k_len) (no cache, consecutive rows)


def _row_groups(meta: AttentionMetadata, device) -> list[_Group]:
    """Rows with the same (query, key) lengths go through one SDPA call."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for b, shape in enumerate(zip(meta.host_seqlens_q, meta.host_seqlens_k)):
        by_shape.setdefault(shape, []).append(b)
    starts = np.concatenate([[0], np.cumsum(meta.host_seqlens_q)])
    groups, indices = [], []
    for (q_len, k_len), rows in by_shape.items():
        if q_len == 0:  # an empty padding row
            continue
        q_index = np.concatenate([np.arange(starts[b], starts[b] + q_len) for b in rows])
        if meta.paged:
            k_index = np.concatenate([_row_slots(meta.host_pages[b], k_len, meta.page_size) for b in rows])
        else:
            k_index = q_index
        k_start = None if meta.paged else _start_if_range(k_index)
        groups.append((len(rows), q_len, k_len, _start_if_range(q_index), k_start))
        indices += [q_index, k_index]
    # One upload for every group's indices.
    sizes = [a.size for a in indices]
    flat = torch.from_numpy(np.concatenate(indices).astype(np.int64)).to(device, non_blocking=True)
    parts = torch.split(flat, sizes)
    return [_Group(n, ql, kl, parts[2 * i], parts[2 * i + 1], qs, ks) for i, (n, ql, kl, qs, ks) in enumerate(groups)]


def _start_if_range(index: np.ndarray) -> int | None:
    """index[0] if index is consecutive integers (a slice reads them in place), else None."""
    return int(index[0]) if np.array_equal(index, np.arange(index[0], index[0] + index.size)) else None


def _grouped(q, kv, groups: list[_Group]) -> torch.Tensor:
    """q [N, H, D]; kv [2, P, page_size, Hkv, D]: the pages, or without a
    cache one scratch page holding the pack's own K/V."""
    N, H, D = q.shape
    Hkv = kv.shape[-2]
    source = kv.view(2, -1, Hkv, D)                                                # [2, slots, Hkv, D]
    whole = len(groups) == 1 and groups[0].q_start == 0 and groups[0].rows * groups[0].q_len == N
    out = None if whole else torch.empty_like(q)
    for g in groups:
        n_q, n_k = g.rows * g.q_len, g.rows * g.k_len
        qg = q[g.q_start:g.q_start + n_q] if g.q_start is not None else q.index_select(0, g.q_index)
        qg = qg.view(g.rows, g.q_len, H, D).transpose(1, 2)                        # [n, H, Lq, D]
        kvg = source[:, g.k_start:g.k_start + n_k] if g.k_start is not None else source.index_select(1, g.k_index)
        kg, vg = (t.view(g.rows, g.k_len, Hkv, D).transpose(1, 2) for t in kvg)  # [n, Hkv, Lk, D]
        y = F.scaled_dot_product_attention(qg, kg, vg, enable_gqa=H != Hkv)       # [n, H, Lq, D]
        y = y.transpose(1, 2).reshape(n_q, H, D)  # a view where SDPA's output is token-major (the CPU's)
        if whole:
            return y
        if g.q_start is not None:
            out[g.q_start:g.q_start + n_q] = y
        else:
            out.index_copy_(0, g.q_index, y)
    return out


# ---- the plain-torch reference ----------------------------------------------
def ragged_attention_reference(q, k, v, meta: AttentionMetadata, k_pages=None, v_pages=None) -> torch.Tensor:
    """The contract of `RaggedAttention` one token, row and head at a time:
    write each query token's K/V at its slot (paged), then softmax(q k^T / sqrt(D)) v
    over the row's keys [0, seqlens_k[b]) (pages through the block table, else
    the row's own tokens). -> [N, H, D]."""
    N, H, D = q.shape
    G = H // k.shape[1]
    if k_pages is not None:
        page_size = k_pages.shape[1]
        for i, slot in enumerate(meta.slot_mapping.tolist()):
            k_pages[slot // page_size, slot % page_size] = k[i]
            v_pages[slot // page_size, slot % page_size] = v[i]
    cu_q = meta.cu_seqlens_q.tolist()
    out = torch.zeros_like(q)
    for b, n_keys in enumerate(meta.seqlens_k.tolist()):
        if k_pages is None:
            keys, values = k[cu_q[b]:cu_q[b] + n_keys], v[cu_q[b]:cu_q[b] + n_keys]
        else:
            pages = meta.block_tables[b].tolist()
            keys = torch.stack([k_pages[pages[i // page_size], i % page_size] for i in range(n_keys)])
            values = torch.stack([v_pages[pages[i // page_size], i % page_size] for i in range(n_keys)])
        for h in range(H):
            scores = q[cu_q[b]:cu_q[b + 1], h].double() @ keys[:, h // G].double().T / math.sqrt(D)
            out[cu_q[b]:cu_q[b + 1], h] = (scores.softmax(-1) @ values[:, h // G].double()).to(q.dtype)
    return out
