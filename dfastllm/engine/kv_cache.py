"""The engine's device memory for running requests: canvas rows and K/V pages.

* `CanvasRows`: one row of token ids per running request ([max_batch_size,
  max_model_len] int64, a few MB at most), handed out at admission and
  taken back when the request leaves. A row never moves.
* `PagePool` (kv_cache prefix / dual): every layer's K/V in fixed-size pages
  of one pool (`PagedKVCache`). A request gets the pages of its whole canvas
  at admission (a full step writes K/V for all of it) and gives them back
  when it finishes, is cancelled or fails; no page is ever moved. Page 0 is
  never handed out: padded tokens of a captured CUDA graph write there.

Prefix caching (LLaDA2, whose finished blocks' K/V are exact): a page whose
K/V is final is registered under a key, a hash of the tokens it depends on
(`LLaDA2Request.prompt_page_keys`, `final_pages`). A later request whose prompt gives the same
keys takes those pages as they are, copy-free: pages are counted by
reference, and one goes back only when no request holds it. An unreferenced
page with a key stays in an LRU (at most `max_cached_pages`) to serve later
hits, and is the first taken when the free list runs out.

The pool's size is fixed when the engine starts (`kv_pool_pages`): a byte
count or a fraction of the device memory free after loading the model,
capped at what max_batch_size canvases of max_model_len could ever use.
Fixed tensors also keep a CUDA graph's K/V addresses valid for its life.
"""

from __future__ import annotations

import collections
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
                 device: torch.device, page_size: int, num_pages: int, max_cached_pages: int | None = None):
        """max_cached_pages: most unreferenced pages kept for prefix hits (None: as many as the pool holds)."""
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (2, num_pages, page_size, n_kv_heads, head_dim)  # K and V of a layer in one tensor
        # Zeros, not empty: no cell may hold NaN, even one that only padding reads.
        self.cache = PagedKVCache(kv=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)])
        self._free = list(range(num_pages - 1, 0, -1))  # page 0 is the scratch page
        self.max_cached_pages = self.capacity if max_cached_pages is None else max_cached_pages
        self._refs = [0] * num_pages
        self._key_of: dict[int, bytes] = {}  # page -> its prefix key (final K/V)
        self._page_of: dict[bytes, int] = {}  # prefix key -> page
        self._unreferenced: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU, oldest first
        self.prefix_queries = 0  # pages looked up by key (monotonic)
        self.prefix_hits = 0  # of those, found

    @property
    def capacity(self) -> int:
        """Pages that requests can hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages a new request can get: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._unreferenced)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages registered under a prefix key (held or not)."""
        return len(self._key_of)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self, tokens: int) -> list[int]:
        """Fresh pages for `tokens` canvas positions; RuntimeError if too few
        are free (the scheduler checks `num_free` first)."""
        return self.allocate_prefix(tokens, [])[0]

    def allocate_prefix(self, tokens: int, keys: list[bytes]) -> tuple[list[int], int]:
        """Pages for `tokens` canvas positions: first the cached pages of the
        leading `keys` that are registered (the hits, shared), then fresh ones;
        -> (pages, hits)."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            self._unreferenced.pop(page, None)
            self._refs[page] += 1
            pages.append(page)
        hits = len(pages)
        self.prefix_queries += len(keys)
        self.prefix_hits += hits
        n = self.pages_for(tokens) - hits
        if n > self.num_free:
            self.release(pages)
            raise RuntimeError(f"KV pool exhausted: {n} pages wanted, {self.num_free} free")
        for _ in range(n):
            page = self._free.pop() if self._free else self._evict()
            self._refs[page] = 1
            pages.append(page)
        return pages, hits

    def register(self, page: int, key: bytes) -> None:
        """Page `page` (held) now holds the final K/V that `key` names; a key
        already registered keeps its page (this one stays private)."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def release(self, pages: list[int]) -> None:
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            if page in self._key_of and self.max_cached_pages > 0:
                self._unreferenced[page] = None
                if len(self._unreferenced) > self.max_cached_pages:
                    self._free.append(self._evict())
            else:
                self._forget(page)
                self._free.append(page)

    def _evict(self) -> int:
        """The least recently released cached page, its key forgotten."""
        page, _ = self._unreferenced.popitem(last=False)
        self._forget(page)
        return page

    def _forget(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]


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
