"""The engine's device memory for running requests: canvas rows and K/V pages.

* `CanvasRows`: one row of token ids per running request ([max_batch_size,
  max_model_len] int64, a few MB at most), handed out at admission and
  taken back when the request leaves. A row never moves.
* `PagePool` (kv_cache prefix / dual): every layer's K/V in fixed-size pages
  of one pool (`PagedKVCache`). A request gets the pages of its whole canvas
  at admission (a full step writes K/V for all of it) and gives them back
  when it finishes, is cancelled or fails; no page is ever moved. Page 0 is
  never handed out: padded tokens of a captured CUDA graph write there.

The pool's size is fixed when the engine starts (`kv_pool_pages`): a byte
count or a fraction of the device memory free after loading the model,
capped at what max_batch_size canvases of max_model_len could ever use.
Fixed tensors also keep a CUDA graph's K/V addresses valid for its life.
"""

from __future__ import annotations

import os

import torch

from dfastllm.models.attention import PagedKVCache


class CanvasRows:
    def __init__(self, *, rows: int, columns: int, fill_id: int, device: torch.device):
        # fill_id: a valid token for never-written cells.
        self.canvas = torch.full((rows, columns), fill_id, dtype=torch.long, device=device)
        self._free = list(range(rows - 1, -1, -1))  # pop() hands out the lowest row first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, tokens: torch.Tensor) -> int:
        """A free row holding `tokens` (prompt + masks) from column 0; -> its index."""
        row = self._free.pop()
        self.canvas[row, :tokens.numel()] = tokens
        return row

    def release(self, row: int) -> None:
        self._free.append(row)


class PagePool:
    def __init__(self, *, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, page_size: int, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (2, num_pages, page_size, n_kv_heads, head_dim)  # K and V of a layer in one tensor
        # Zeros, not empty: no cell may hold NaN, even one that only padding reads.
        self.cache = PagedKVCache(kv=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)])
        self._free = list(range(num_pages - 1, 0, -1))  # page 0 is the scratch page

    @property
    def capacity(self) -> int:
        """Pages that requests can hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self, tokens: int) -> list[int]:
        """Pages for `tokens` canvas positions; RuntimeError if too few are free
        (the scheduler checks `num_free` first)."""
        n = self.pages_for(tokens)
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {n} pages wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def bytes_per_page(*, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, page_size: int) -> int:
    return 2 * n_layers * page_size * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def kv_pool_pages(kv_cache_memory: float, page_bytes: int, device: torch.device, most_pages: int) -> int:
    """Pages in the pool: kv_cache_memory bytes (> 1) or that fraction (<= 1) of
    the device memory free now (on the CPU, of the memory available), capped at
    `most_pages` (+1 scratch); ValueError if that is not even two pages."""
    if not kv_cache_memory > 0:
        raise ValueError(f"kv_cache_memory must be > 0 (bytes, or a fraction of free memory), got {kv_cache_memory}")
    budget = kv_cache_memory if kv_cache_memory > 1 else kv_cache_memory * free_memory(device)
    pages = min(int(budget // page_bytes), most_pages + 1)
    if pages < 2:
        raise ValueError(f"kv_cache_memory {kv_cache_memory:g} holds {pages} page(s) of {page_bytes} bytes; "
                         "at least 2 are needed")
    return pages


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
