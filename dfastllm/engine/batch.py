"""The inputs of one denoising step: a ragged batch, built on the host.

Every row contributes its query tokens to ONE forward over packed tokens:

* a full row (kv_cache none, or the first step of a block in the cached
  modes) queries its whole canvas [0, L_r);
* a cached row queries only what changes: `dual` the current block,
  `prefix` the block and everything after it; for Dream (logits shift 1) one
  position earlier too, since position p's logits come from hidden p-1.

The rows' query tokens are packed back to back ([N] ids and positions, N
the sum of the rows' query lengths): nothing is padded to the longest row
and no mask exists. `AttentionMetadata` says where each row's queries are
(cumulative offsets) and how many keys it has (its canvas length); in the
cached modes, also its block table and the pool slot of each query token,
where that token's K/V is written before attention reads the pages
(kv_cache none: token i's slot is i, in a scratch page of the step's tokens).

Block-causal attention (LLaDA2, `Request.attention_block` > 0): a row's
queries span whole blocks (its current block, and the finished blocks whose
K/V it computes), and each block is its own attention row, seeing the
canvas only up to its block's end; its tokens stay one request in the pack.

A step replayed as a CUDA graph (`pad_to`) is padded up to its bucket of
tokens and rows: the padding tokens form one extra row that attends only
to the scratch page, and the other padding rows are empty.

Candidates (the masked positions of each row's current block) are listed
row after row in canvas-row order; the commit kernel sees the whole canvas,
with no candidates in rows that do not step. All integer inputs travel to
the device as one int64 upload, all float inputs as one float32 upload.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dfastllm.engine.request import Request
from dfastllm.engine.sampler import SamplingInputs, SamplingPlan
from dfastllm.models.attention import AttentionMetadata


@dataclasses.dataclass
class StepBatch:
    input_ids: torch.Tensor  # [N] long, the rows' query tokens packed
    position_ids: torch.Tensor  # [N] long
    attn: AttentionMetadata
    query_tokens: int  # N without padding
    full_rows: int  # rows that run over their whole canvas this step
    # Candidates (masked positions of each row's current block), in canvas-row order.
    hidden_index: torch.Tensor  # [n] index into the packed hidden states [N, D]
    cand_rows: torch.Tensor  # [n] canvas row
    cand_positions: torch.Tensor  # [n] canvas position
    cand_offsets: torch.Tensor  # [canvas rows + 1] int32
    sampling: SamplingInputs  # what the sampler needs per candidate and per canvas row
    # Host copies for reading the step's result back.
    host_positions: np.ndarray  # [n]
    host_offsets: list[int]  # [rows + 1], per stepped row (in `requests` order)


def query_extent(r: Request, cache_mode: str, logits_shift: int) -> tuple[int, int]:
    """The canvas positions [start, end) that request r queries at its next step."""
    if r.attention_block:
        return r.query_extent(cache_mode)
    if cache_mode == "none" or r.needs_full_forward:
        return 0, r.canvas_len
    return r.block_start - logits_shift, (r.block_end if cache_mode == "dual" else r.canvas_len)


def attention_rows(r: Request, start: int, end: int) -> list[tuple[int, int]]:
    """(query end, key length) of each attention row of request r's queries
    [start, end): one seeing its whole canvas, or under block-causal attention
    one per block, each seeing the canvas up to that block's end."""
    if not r.attention_block:
        return [(end, r.canvas_len)]
    ends = list(range((start // r.attention_block + 1) * r.attention_block, end, r.attention_block)) + [end]
    return [(e, e) for e in ends]


def build_step(requests: list[Request], canvas: torch.Tensor, *, cache_mode: str, logits_shift: int,
               page_size: int = 0, pad_to: tuple[int, int, int] | None = None) -> StepBatch:
    """Inputs for one step of `requests` (in ascending canvas row, `r.slot`);
    page_size: of the KV pool (0: no pool); pad_to: (tokens, rows, pages per
    row) of a CUDA graph bucket, at least one row more than `requests`."""
    device = canvas.device
    n_rows, canvas_rows = len(requests), canvas.shape[0]
    cached = page_size > 0  # over the page pool (LLaDA2 always, even with kv_cache none)
    slots = np.array([r.slot for r in requests], dtype=np.int64)
    lengths = np.array([r.canvas_len for r in requests], dtype=np.int64)
    extents = np.array([query_extent(r, cache_mode, logits_shift) for r in requests], dtype=np.int64)
    q_start, q_len = extents[:, 0], extents[:, 1] - extents[:, 0]
    cu_q = np.concatenate([[0], np.cumsum(q_len)])
    n_tokens = int(cu_q[-1])
    token_row = np.repeat(np.arange(n_rows), q_len)
    token_pos = q_start[token_row] + np.arange(n_tokens) - cu_q[token_row]
    canvas_index = slots[token_row] * canvas.shape[1] + token_pos
    # Attention rows: one per request, or one per block under block-causal attention.
    splits = [attention_rows(r, int(q_start[i]), int(extents[i, 1])) for i, r in enumerate(requests)]
    attn_req = np.repeat(np.arange(n_rows), [len(rows) for rows in splits])
    attn_end = np.array([e for rows in splits for e, _ in rows], dtype=np.int64)
    seqlens_k = np.array([k for rows in splits for _, k in rows], dtype=np.int64)
    attn_q_len = attn_end - np.concatenate([[0], attn_end[:-1]])
    first = np.concatenate([[0], np.cumsum([len(rows) for rows in splits])[:-1]])
    attn_q_len[first] = attn_end[first] - q_start  # each request's first row starts at its query start
    cu_attn = np.concatenate([[0], np.cumsum(attn_q_len)])
    n_attn = len(attn_req)

    pages = [requests[i].pages for i in attn_req] if cached else []
    table = np.zeros((0, 0), dtype=np.int64)
    slot_mapping = np.arange(n_tokens, dtype=np.int64)  # kv_cache none: the step's own scratch page
    if cached:
        width = pad_to[2] if pad_to else max(len(p) for p in pages)
        table = np.zeros((n_rows, width), dtype=np.int64)
        for i, r in enumerate(requests):
            table[i, :len(r.pages)] = r.pages
        slot_mapping = table[token_row, token_pos // page_size] * page_size + token_pos % page_size
        table = table[attn_req]
    max_q, max_k = int(attn_q_len.max()), int(seqlens_k.max())
    if pad_to is not None:
        # The padding tokens are one extra row over the scratch page (page 0,
        # slot 0), so every token of the pack belongs to a row; further rows are empty.
        tokens, rows, _ = pad_to
        extra = tokens - n_tokens
        assert extra >= 0 and rows > n_attn, (pad_to, n_tokens, n_attn)
        cu_attn = np.concatenate([cu_attn, np.full(rows - n_attn, tokens)])
        seqlens_k = np.concatenate([seqlens_k, np.ones(rows - n_attn, dtype=np.int64)])
        table = np.concatenate([table, np.zeros((rows - n_attn, table.shape[1]), dtype=np.int64)])
        canvas_index = np.concatenate([canvas_index, np.zeros(extra, dtype=np.int64)])
        token_pos = np.concatenate([token_pos, np.zeros(extra, dtype=np.int64)])
        slot_mapping = np.concatenate([slot_mapping, np.zeros(extra, dtype=np.int64)])
        max_q = tokens  # bounds fixed per bucket: the graph bakes them in

    positions = [r.masked_positions() for r in requests]
    counts = np.array([p.size for p in positions], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    cand_pos = np.concatenate(positions)
    cand_req = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    hidden_index = cu_q[cand_req] + cand_pos - logits_shift - q_start[cand_req]
    sampling = SamplingPlan(requests, counts, cand_pos, lengths, slots=slots, canvas_rows=canvas_rows)

    cu_k = np.concatenate([[0], np.cumsum(seqlens_k)])
    ints = [canvas_index, token_pos, slot_mapping, cu_attn, cu_k, seqlens_k, table.ravel(), hidden_index,
            slots[cand_req], cand_pos, sampling.row_offsets]
    int_parts = upload_arrays(ints + sampling.ints, np.int64, device)
    float_parts = upload_arrays(sampling.floats, np.float32, device)
    (canvas_index_t, positions_t, slot_mapping_t, cu_q_t, cu_k_t, seqlens_k_t, table_t, hidden_index_t, cand_rows_t,
     cand_pos_t, offsets_t) = int_parts[:len(ints)]

    attn = AttentionMetadata(
        cu_seqlens_q=cu_q_t.to(torch.int32), cu_seqlens_k=cu_k_t.to(torch.int32),
        seqlens_k=seqlens_k_t.to(torch.int32), max_seqlen_q=max_q, max_seqlen_k=max_k,
        block_tables=table_t.view(table.shape).to(torch.int32) if cached else None,
        slot_mapping=slot_mapping_t, page_size=page_size,
        host_seqlens_q=attn_q_len.tolist(), host_seqlens_k=seqlens_k[:n_attn].tolist(), host_pages=pages)
    return StepBatch(
        input_ids=canvas.view(-1).index_select(0, canvas_index_t), position_ids=positions_t,
        attn=attn, query_tokens=n_tokens, full_rows=int(sum(r.needs_full_forward or not cached for r in requests)),
        hidden_index=hidden_index_t, cand_rows=cand_rows_t, cand_positions=cand_pos_t,
        cand_offsets=offsets_t.to(torch.int32),
        sampling=sampling.on_device(int_parts[len(ints):], float_parts),
        host_positions=cand_pos, host_offsets=offsets.tolist(),
    )


def upload_arrays(arrays: list[np.ndarray], dtype, device: torch.device) -> list[torch.Tensor]:
    """One host-to-device copy for many small arrays; -> device views, one per array."""
    sizes = [a.size for a in arrays]
    packed = torch.from_numpy(np.concatenate([a.astype(dtype, copy=False).ravel() for a in arrays]))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    return list(torch.split(packed, sizes))
