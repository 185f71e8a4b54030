"""Attention over a ragged batch: the interface between the engine and a model forward.

A step packs the query tokens of every row into one token dimension
([N, H, D] after the projections, no padding between rows). Per row b:

* queries are tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1] of the pack;
* keys are the row's canvas positions [0, seqlens_k[b]). Without a cache
  (kv_cache none) they are the row's own packed tokens (a full row queries
  its whole canvas); with the paged cache they live in pages of
  `PagedKVCache`, found through the row's block table, and every query
  token first writes its own K/V at slot_mapping (page * page_size + offset).

Attention is bidirectional within a row and never crosses rows. Three
implementations of the same contract:

* `flash`: torch's varlen flash attention (`torch.nn.attention.varlen`),
  on CUDA in fp16/bf16, reading pages through the block table when the
  page size suits the kernel (torch's FA2 wants multiples of 256), else
  over the rows' keys gathered into one packed tensor;
* `grouped`: scaled_dot_product_attention per group of rows with the same
  (query, key) lengths (in steady state all cached rows form one group), over
  keys gathered from the pages: its cost follows the real tokens. The CPU's,
  and CUDA's in fp32;
* `ragged_attention_reference`: plain torch, one row and one head at a
  time, for the parity tests.

`AttentionMetadata` is built by the engine (`engine/batch.py`); a model
forward takes it inside a `RaggedAttention`, whose call does the K/V write
and the attention of one layer. A fused kernel (RoPE + page write, say)
plugs in by replacing that call.
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

# torch's FA2 reads paged K/V only for pages of a multiple of this many tokens.
FLASH_PAGE_MULTIPLE = 256


@dataclasses.dataclass
class PagedKVCache:
    """K/V pages of every layer: k[layer], v[layer] are [num_pages, page_size, Hkv, D]
    (the layout flash attention's block table addresses). Allocated once by
    the engine (`engine/kv_cache.py`); models only write and read through
    `RaggedAttention`."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


@dataclasses.dataclass
class AttentionMetadata:
    """Where each row's queries and keys are, for one ragged forward of B rows over N tokens."""
    cu_seqlens_q: torch.Tensor  # [B+1] int32, row b's queries are pack tokens [cu[b], cu[b+1])
    cu_seqlens_k: torch.Tensor  # [B+1] int32, offsets of the rows' keys packed row after row
    seqlens_k: torch.Tensor  # [B] int32, row b attends to its canvas positions [0, seqlens_k[b])
    max_seqlen_q: int  # upper bounds over the rows (a captured graph uses its bucket's)
    max_seqlen_k: int
    block_tables: torch.Tensor | None = None  # [B, max_pages] int32 page ids (paged cache)
    slot_mapping: torch.Tensor | None = None  # [N] int64 pool slot each query token's K/V goes to
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


class RaggedAttention:
    """One forward's attention: called per layer with that layer's packed
    q [N, H, D], k, v [N, Hkv, D] (RoPE applied) -> [N, H, D]."""

    def __init__(self, metadata: AttentionMetadata, cache: PagedKVCache | None = None):
        if metadata.paged != (cache is not None):
            raise ValueError("a paged cache and block tables go together")
        self.meta = metadata
        self.cache = cache
        self._groups = None  # the grouped implementation's row groups, built at the first layer
        self._key_slots = None  # the flash implementation's gathered keys' slots (pages it cannot read)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        k_pages = v_pages = None
        if self.cache is not None:
            k_pages, v_pages = self.cache.k[layer], self.cache.v[layer]
            write_pages(k_pages, v_pages, meta.slot_mapping, k, v)
        if flash_usable(q.dtype, q.device, q.shape[-1], q.shape[1] != k.shape[1]):
            if k_pages is not None and not flash_reads_pages(meta.page_size) and self._key_slots is None:
                slots = [_row_slots(p, n, meta.page_size) for p, n in zip(meta.host_pages, meta.host_seqlens_k)]
                self._key_slots = torch.from_numpy(np.concatenate(slots)).to(q.device, non_blocking=True)
            return _flash(q, k, v, k_pages, v_pages, meta, self._key_slots)
        if self._groups is None:
            self._groups = _row_groups(meta, q.device)
        return _grouped(q, k, v, k_pages, v_pages, self._groups)


def write_pages(k_pages, v_pages, slot_mapping, k, v) -> None:
    """Scatter k, v [N, Hkv, D] into the pages at slot_mapping [N] (in place)."""
    k_pages.view(-1, *k_pages.shape[2:]).index_copy_(0, slot_mapping, k)
    v_pages.view(-1, *v_pages.shape[2:]).index_copy_(0, slot_mapping, v)


# ---- flash (CUDA) -------------------------------------------------------------
def _flash(q, k, v, k_pages, v_pages, meta: AttentionMetadata, key_slots=None) -> torch.Tensor:
    common = {}
    if q.shape[1] != k.shape[1]:
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
        groups.append((len(rows), q_len, k_len))
        indices += [q_index, k_index]
    # One upload for every group's indices.
    sizes = [a.size for a in indices]
    flat = torch.from_numpy(np.concatenate(indices).astype(np.int64)).to(device, non_blocking=True)
    parts = torch.split(flat, sizes)
    return [_Group(n, ql, kl, parts[2 * i], parts[2 * i + 1]) for i, (n, ql, kl) in enumerate(groups)]


def _grouped(q, k, v, k_pages, v_pages, groups: list[_Group]) -> torch.Tensor:
    N, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    key_source = k if k_pages is None else k_pages.view(-1, Hkv, D)
    value_source = v if v_pages is None else v_pages.view(-1, Hkv, D)
    out = torch.empty_like(q)
    for g in groups:
        # Query heads sharing a K/V head are folded into the query length: no K/V copy per head.
        qg = q.index_select(0, g.q_index).view(g.rows, g.q_len, Hkv, G, D)
        qg = qg.permute(0, 2, 3, 1, 4).reshape(g.rows, Hkv, G * g.q_len, D)                  # [n, Hkv, G*Lq, D]
        kg = key_source.index_select(0, g.k_index).view(g.rows, g.k_len, Hkv, D).transpose(1, 2)  # [n, Hkv, Lk, D]
        vg = value_source.index_select(0, g.k_index).view(g.rows, g.k_len, Hkv, D).transpose(1, 2)
        y = F.scaled_dot_product_attention(qg, kg, vg)                                      # [n, Hkv, G*Lq, D]
        y = y.view(g.rows, Hkv, G, g.q_len, D).permute(0, 3, 1, 2, 4).reshape(g.rows * g.q_len, H, D)
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
