"""The running batch's device buffers: one canvas row per running request
and, in the cached modes, that row's K/V in every layer.

Slots are kept compact: the running requests occupy rows 0..B-1, so the
batch's canvas and cache views are plain slices. A finished request's row is
filled by moving a later one down (canvas and cache rows together).

Capacity grows on demand (rows and columns), to what the batch needs now
rounded up, so memory follows the admitted work (bounded by max_num_tokens)
rather than max_batch_size x max_model_len. The cache has one column more
than the canvas, so a step's cache view (the longest canvas plus a scratch
column, where padded queries write their K/V and no row ever attends,
rounded up to whole COLUMN_ALIGN buckets: see build_step) always fits.
"""

from __future__ import annotations

import torch

from dfastllm.models import KVCache

COLUMN_ALIGN = 64
ROW_ALIGN = 4


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


class BatchBuffers:
    def __init__(self, *, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, with_cache: bool, max_rows: int, max_columns: int, fill_id: int):
        self.shape_kv = (n_layers, n_kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.with_cache = with_cache
        self.max_rows = max_rows
        self.max_columns = max_columns  # the longest canvas the engine admits
        self.fill_id = fill_id  # a valid token for never-written canvas cells (padding reads them)
        self.canvas = torch.empty(0, 0, dtype=torch.long, device=device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.version = 0  # bumped when the tensors are reallocated (CUDA graphs hold their addresses)

    @property
    def rows(self) -> int:
        return self.canvas.shape[0]

    @property
    def columns(self) -> int:
        return self.canvas.shape[1]

    def ensure(self, rows: int, columns: int, live_rows: int) -> None:
        """Make room for `rows` x `columns` canvas cells, keeping the first
        `live_rows` rows (canvas and cache) when reallocating."""
        if rows <= self.rows and columns <= self.columns:
            return
        new_rows = min(round_up(max(rows, 1), ROW_ALIGN), self.max_rows)
        new_cols = min(round_up(max(columns, 1), COLUMN_ALIGN), self.max_columns)
        keep_r, keep_c = min(live_rows, self.rows), min(new_cols, self.columns)
        canvas = torch.full((new_rows, new_cols), self.fill_id, dtype=torch.long, device=self.device)
        canvas[:keep_r, :keep_c] = self.canvas[:keep_r, :keep_c]
        if self.with_cache:
            n_layers, n_kv_heads, head_dim = self.shape_kv
            shape = (new_rows, n_kv_heads, new_cols + 1, head_dim)
            # Zeros, not empty: a masked-out key still meets its value in the
            # attention product (0 * NaN = NaN), so no cell may hold garbage.
            k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n_layers)]
            v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n_layers)]
            for new, old in zip(k + v, self.k + self.v):
                new[:keep_r, :, :keep_c] = old[:keep_r, :, :keep_c]
            self.k, self.v = k, v
        self.canvas = canvas
        self.version += 1

    def load_row(self, row: int, tokens: torch.Tensor) -> None:
        """Write a new request's canvas (prompt + masks) into its row."""
        self.canvas[row, :tokens.numel()] = tokens

    def move_rows(self, src: list[int], dst: list[int], with_cache: list[bool]) -> None:
        """Compaction: row src[i] -> row dst[i] (every dst below its src, in
        ascending order, so no live row is overwritten before it moved)."""
        if not src:
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        self.canvas.index_copy_(0, d, self.canvas.index_select(0, s))
        cache_src = [a for a, keep in zip(src, with_cache) if keep]
        if self.with_cache and cache_src:
            cs = torch.tensor(cache_src, device=self.device)
            cd = torch.tensor([b for b, keep in zip(dst, with_cache) if keep], device=self.device)
            for t in self.k + self.v:
                t.index_copy_(0, cd, t.index_select(0, cs))

    def cache_view(self, rows: int, columns: int) -> KVCache:
        """The first `rows` rows and `columns` columns of every layer's K/V."""
        return KVCache([t[:rows, :, :columns] for t in self.k], [t[:rows, :, :columns] for t in self.v])
