"""The inputs of one denoising step over the running batch, built on the host.

Every row contributes queries to ONE forward:

* a full row (kv_cache none, or the first step of a block in the cached
  modes) queries its whole canvas [0, L_r);
* a cached row queries only what changes: `dual` the current block,
  `prefix` the block and everything after it; for Dream (logits shift 1) one
  position earlier too, since position p's logits come from hidden p-1.

Rows are right-padded to the longest query list. Keys are masked per row
(key s is visible iff s < L_r), so padding never changes a row's result;
padded queries read token 0 and, in the cached modes, write their K/V into
the scratch column (the last one of the cache view, past every row's
canvas), never a real slot. The cache view spans the longest canvas plus
the scratch column rounded up to whole 64-column buckets (masked past each
row's length), so a step's shapes change only when the longest canvas
crosses a bucket, and a CUDA graph captured for them is replayed step after
step.

All integer inputs travel to the device as one int64 upload, all float
inputs as one float32 upload.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dfastllm.engine.kv_cache import COLUMN_ALIGN, round_up
from dfastllm.engine.request import Request
from dfastllm.engine.sampler import SamplingInputs, SamplingPlan


@dataclasses.dataclass
class StepBatch:
    rows: int
    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long
    attn_mask: torch.Tensor | None  # [B, 1, T, S] bool, None when nothing is padded
    cache_positions: torch.Tensor | None  # [B, T] long (cached modes)
    cache_columns: int  # S of the cache view (cached modes), a whole number of buckets
    full_rows: int  # rows that run over their whole canvas this step
    # Candidates (masked positions of each row's current block), row-major.
    hidden_index: torch.Tensor  # [N] index into hidden.reshape(B*T, D)
    cand_rows: torch.Tensor  # [N] batch row
    cand_positions: torch.Tensor  # [N] canvas position
    cand_offsets: torch.Tensor  # [B+1] int32
    sampling: SamplingInputs  # what the sampler needs per candidate and per row
    # Host copies for reading the step's result back.
    host_positions: np.ndarray  # [N]
    host_offsets: list[int]  # [B+1]


def build_step(requests: list[Request], canvas: torch.Tensor, *, cache_mode: str, logits_shift: int
               ) -> StepBatch:
    """Inputs for one step of `requests` (running, in slot order: request i is row i)."""
    device = canvas.device
    n_rows = len(requests)
    lengths = np.array([r.canvas_len for r in requests], dtype=np.int64)
    longest = int(lengths.max())
    cached = cache_mode != "none"
    full = [not cached or r.needs_full_forward for r in requests]
    q_start = np.zeros(n_rows, dtype=np.int64)
    q_end = lengths.copy()
    for i, r in enumerate(requests):
        if not full[i]:
            q_start[i] = r.block_start - logits_shift
            q_end[i] = r.block_end if cache_mode == "dual" else r.canvas_len
    q_len = q_end - q_start
    width = int(q_len.max())

    columns = np.arange(width, dtype=np.int64)
    real = columns[None, :] < q_len[:, None]  # [B, T]
    query_pos = np.where(real, q_start[:, None] + columns[None, :], 0)
    # The cache has one column more than the canvas, so the view fits.
    cache_columns = min(round_up(longest + 1, COLUMN_ALIGN), canvas.shape[1] + 1) if cached else 0
    cache_pos = np.where(real, query_pos, cache_columns - 1)  # the scratch column

    positions = [r.masked_positions() for r in requests]
    counts = np.array([p.size for p in positions], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    cand_pos = np.concatenate(positions)
    cand_rows = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    hidden_index = cand_rows * width + (cand_pos - logits_shift - q_start[cand_rows])
    sampling = SamplingPlan(requests, counts, cand_pos, lengths)

    ints = [query_pos.ravel(), cache_pos.ravel(), hidden_index, cand_rows, cand_pos, offsets, lengths]
    int_parts = _upload(ints + sampling.ints, np.int64, device)
    float_parts = _upload(sampling.floats, np.float32, device)
    (query_pos_t, cache_pos_t, hidden_index_t, cand_rows_t, cand_pos_t, offsets_t, lengths_t) = int_parts[:len(ints)]

    query_pos_t = query_pos_t.view(n_rows, width)
    input_ids = canvas[:n_rows].gather(1, query_pos_t)
    if cached:
        attn_mask = _key_mask(lengths_t, width, cache_columns)
    else:
        padded = bool((lengths != longest).any())
        attn_mask = _key_mask(lengths_t, width, width) if padded else None
    return StepBatch(
        rows=n_rows, input_ids=input_ids, position_ids=query_pos_t, attn_mask=attn_mask,
        cache_positions=cache_pos_t.view(n_rows, width) if cached else None, cache_columns=cache_columns,
        full_rows=sum(full), hidden_index=hidden_index_t, cand_rows=cand_rows_t, cand_positions=cand_pos_t,
        cand_offsets=offsets_t.to(torch.int32), sampling=sampling.on_device(int_parts[len(ints):], float_parts),
        host_positions=cand_pos, host_offsets=offsets.tolist(),
    )


def _upload(arrays: list[np.ndarray], dtype, device: torch.device) -> list[torch.Tensor]:
    """One host-to-device copy for many small arrays; -> device views, one per array."""
    sizes = [a.size for a in arrays]
    packed = torch.from_numpy(np.concatenate([a.astype(dtype, copy=False).ravel() for a in arrays]))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    return list(torch.split(packed, sizes))


def _key_mask(lengths: torch.Tensor, queries: int, keys: int) -> torch.Tensor:
    """[B, 1, queries, keys] bool: key s visible to every query of row b iff s < lengths[b]."""
    visible = torch.arange(keys, device=lengths.device)[None, :] < lengths[:, None]  # [B, S]
    return visible[:, None, None, :].expand(-1, 1, queries, keys)
