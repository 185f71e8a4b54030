"""CUDA graphs of the cached step's forward.

A cached step (kv_cache dual or prefix, not a block's first step) runs the
same few hundred small kernels every time: on an 8B model at batch 1 the GPU
needs about the time to read the weights, while launching ~45 kernels per
layer from Python takes longer than that. So the forward of such a step is
captured once per shape and replayed: the step's inputs are copied into the
graph's static tensors, one replay, and the hidden states are read from its
static output before anything else runs. Sampling and commit stay eager:
their candidate count changes every step and they are a handful of kernels.

A shape is (rows, query width, cache columns). In steady state there are
few: rows follow the running batch size, the width is the block length
(+1 for Dream's shift; prefix mode also the tail), and build_step rounds the
cache columns up to 64-column buckets of the longest canvas. A graph
holds the addresses of the K/V buffers it was captured against, so all are
dropped when the buffers are reallocated; the least recently used is dropped
past `max_graphs`. Every graph allocates from one shared memory pool: steps
replay one at a time, and each replay's output is consumed before the next.

If a capture fails (an op that cannot be captured, say, in a model this
was not tried with), the engine logs it once and runs every later cached
step eagerly: slower, never wrong, and no request fails for it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static input_ids, position_ids, attn_mask, cache_positions
    hidden: torch.Tensor  # static output [rows, width, D]


class CachedStepGraphs:
    def __init__(self, model: torch.nn.Module, max_graphs: int = 32):
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self.buffers_version = -1
        self.pool = None
        self.captures = 0  # graphs captured so far (tests and logs)
        self.failed = False  # a capture failed: every later step runs eagerly

    def forward(self, batch, kv_cache, buffers_version: int) -> torch.Tensor:
        """The model's hidden states for a cached step `batch` (a StepBatch)
        attending to `kv_cache` (views of buffers at `buffers_version`)."""
        if self.failed:
            return self.model(batch.input_ids, batch.position_ids, batch.attn_mask, kv_cache, batch.cache_positions)
        if buffers_version != self.buffers_version:
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()
            self.buffers_version = buffers_version
        args = (batch.input_ids, batch.position_ids, batch.attn_mask, batch.cache_positions)
        key = tuple(t.shape for t in args)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            try:
                entry = self.graphs[key] = self._capture(args, kv_cache)
            except RuntimeError as error:
                logger.warning("CUDA graph capture failed; cached steps run eagerly from now on: %s", error)
                self.failed = True
                self.graphs.clear()
                return self.forward(batch, kv_cache, buffers_version)
        self.graphs.move_to_end(key)
        for static, value in zip(entry.inputs, args):
            static.copy_(value)
        entry.graph.replay()
        return entry.hidden

    def _capture(self, args, kv_cache) -> _Graph:
        # Static inputs live outside the pool (plain allocations), so no other
        # graph's replay can overwrite them.
        inputs = tuple(t.clone(memory_format=torch.contiguous_format) for t in args)
        # One eager run on a side stream first: lazy initialisation (cuBLAS
        # workspaces, autotuning) may not happen inside a capture. It writes
        # the same K/V the replay will write.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(*inputs[:3], kv_cache, inputs[3])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(*inputs[:3], kv_cache, inputs[3])
        self.captures += 1
        return _Graph(graph, inputs, hidden)
