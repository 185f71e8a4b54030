"""CUDA graphs of the cached step's forward.

A cached step (kv_cache dual or prefix, no row at a block's first step)
runs the same few hundred small kernels every time: on an 8B model at batch
1 the GPU needs about the time to read the weights, while launching ~45
kernels per layer from Python takes longer than that. So the forward of
such a step is captured once per bucket and replayed: the step's inputs are
copied into the graph's static tensors, one replay, and the hidden states
are read from its static output before anything else runs. Sampling and
commit stay eager: their candidate count changes every step and they are a
handful of kernels.

A bucket is (query tokens, rows): `bucket` rounds the step's tokens up to a
multiple of 64 (256 past 1024) and its rows up to 1, 2, 4, 8, then
multiples of 8, always leaving one padding row, which holds the padding
tokens (see `build_step`). The attention reads K/V through block tables
from the page pool, whose tensors never move, so a graph stays valid for
the engine's life however the batch changes; its block tables have a fixed
width (the pages of max_model_len) and its bounds on query and key lengths
are the bucket's. The least recently used graph is dropped past
`max_graphs`. Every graph allocates from one shared memory pool: steps
replay one at a time, and each replay's output is consumed before the next.

Graphs need attention whose every input lives on the device: torch's
varlen flash attention reading pages in place (`graphs_supported`). The
engine pads a step to its bucket exactly when it will replay it, and if a
capture fails (an op that cannot be captured, say, in a model this was not
tried with) it logs once and runs every later cached step eagerly on the
same padded inputs: slower, never wrong, and no request fails for it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import torch

from dfastllm.models.attention import (AttentionMetadata, PagedKVCache, RaggedAttention, flash_reads_pages,
                                       flash_usable)

logger = logging.getLogger(__name__)


def graphs_supported(dtype: torch.dtype, device: torch.device, config, page_size: int) -> bool:
    """config: the model's (head_dim, n_heads, n_kv_heads)."""
    return (device.type == "cuda" and flash_reads_pages(page_size)
            and flash_usable(dtype, device, config.head_dim, config.n_kv_heads != config.n_heads))


def round_tokens(n: int) -> int:
    step = 64 if n <= 1024 else 256
    return max(step, -(-n // step) * step)


def round_rows(n: int) -> int:
    return next(b for b in (1, 2, 4, 8) if b >= n) if n <= 8 else -(-n // 8) * 8


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static input_ids, position_ids and attention metadata tensors
    hidden: torch.Tensor  # static output [tokens, D]


class CachedStepGraphs:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *, max_pages: int, max_seqlen_k: int,
                 max_graphs: int = 32):
        self.model = model
        self.cache = cache
        self.max_pages = max_pages  # block table width: pages of the longest canvas
        self.max_seqlen_k = max_seqlen_k
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict[tuple[int, int], _Graph] = collections.OrderedDict()
        self.pool = None
        self.captures = 0  # graphs captured so far (tests and logs)
        self.failed = False  # a capture failed: every later step runs eagerly

    def bucket(self, requests, query_tokens) -> tuple[int, int, int]:
        """-> pad_to for build_step: (tokens, rows, block table width) of this step's bucket."""
        tokens = sum(query_tokens(r) for r in requests)
        return round_tokens(tokens), round_rows(len(requests) + 1), self.max_pages

    def forward(self, batch) -> torch.Tensor:
        """The model's hidden states [tokens, D] for a cached step `batch`
        (a StepBatch padded to a bucket)."""
        meta = batch.attn
        args = (batch.input_ids, batch.position_ids, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.seqlens_k,
                meta.block_tables, meta.slot_mapping)
        if self.failed:
            return self.model.forward_packed(batch.input_ids, batch.position_ids, RaggedAttention(meta, self.cache))
        key = (batch.input_ids.shape[0], meta.seqlens_k.shape[0])
        entry = self.graphs.get(key)
        if entry is None:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            try:
                entry = self.graphs[key] = self._capture(args, meta.page_size)
            except RuntimeError as error:
                logger.warning("CUDA graph capture failed; cached steps run eagerly from now on: %s", error)
                self.failed = True
                self.graphs.clear()
                return self.forward(batch)
        self.graphs.move_to_end(key)
        for static, value in zip(entry.inputs, args):
            static.copy_(value)
        entry.graph.replay()
        return entry.hidden

    def _capture(self, args, page_size: int) -> _Graph:
        # Static inputs live outside the pool (plain allocations), so no other
        # graph's replay can overwrite them.
        inputs = tuple(t.clone(memory_format=torch.contiguous_format) for t in args)
        ids, positions, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_tables, slots = inputs
        # The bucket's bounds, not this step's: the graph bakes them in.
        meta = AttentionMetadata(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqlens_k=seqlens_k, max_seqlen_q=ids.shape[0],
                                 max_seqlen_k=self.max_seqlen_k, block_tables=block_tables, slot_mapping=slots,
                                 page_size=page_size)
        # One eager run on a side stream first: lazy initialisation (cuBLAS
        # workspaces, autotuning) may not happen inside a capture. It writes
        # the same K/V the replay will write.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.forward_packed(ids, positions, RaggedAttention(meta, self.cache))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model.forward_packed(ids, positions, RaggedAttention(meta, self.cache))
        self.captures += 1
        return _Graph(graph, inputs, hidden)
