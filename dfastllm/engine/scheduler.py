"""Which requests run, and which of them step, at the next denoising step.

Two budgets bound the work, both counted in what is really computed or held:

* query tokens per step (max_num_batched_tokens): a row costs the tokens it
  queries this step (its whole canvas at a block's first step or with
  kv_cache none; its block, or block and tail, in a cached step);
* KV pages (cached modes): a running request holds the pages of its whole
  canvas from admission until it leaves (with prefix caching, some of them
  shared: the cached pages of its prompt's prefix).

Admission is strictly first come first served: the head of the queue joins
when a canvas row is free (max_batch_size), the pool has its pages, and its
first (full) step fits in the step's token budget beside the running rows'
next steps; nothing behind it overtakes it. A request that can never fit
(its canvas alone exceeds the token budget, or needs more pages than the
whole pool) is refused by `EngineCore.add_request` with a ValueError, so the
queue never holds one. Nothing running is ever dropped to make room.

Which running rows step: when the running rows' next steps together exceed
the token budget (several rows starting a block at once), the rows that
waited longest since their last step go first and the rest wait one step;
so every row steps within a few steps and none starves. Waiting a step
changes no request's tokens, only when they come.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from dfastllm.engine.kv_cache import CanvasRows, PagePool
from dfastllm.engine.request import Request


class Scheduler:
    def __init__(self, *, max_batch_size: int, max_num_batched_tokens: int, canvas: CanvasRows,
                 pool: PagePool | None, query_tokens: Callable[[Request], int], prefix_caching: bool = False):
        """query_tokens(r): what request r queries at its next step; prefix_caching:
        a request starts on the cached pages of its prompt's prefix (kv_cache.py)."""
        self.prefix_caching = prefix_caching
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.canvas = canvas
        self.pool = pool
        self.query_tokens = query_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order
        self.live: dict[str, Request] = {}  # waiting or running, by id
        self._steps = 0  # steps scheduled so far (orders rows by when they last stepped)

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.live[request.request_id] = request

    def remove(self, request: Request) -> None:
        """Drop a request wherever it is (finished, aborted, expired, failed);
        its canvas row and pages go back at once."""
        del self.live[request.request_id]
        if request.slot >= 0:
            self.running.remove(request)
            self.canvas.release(request.slot)
            request.slot = -1
            if self.pool is not None:
                self.pool.release(request.pages)
                request.pages = []
        else:
            self.waiting.remove(request)

    def expired(self, now: float) -> list[Request]:
        """Live requests whose deadline has passed (not yet removed)."""
        return [r for r in self.live.values() if r.deadline is not None and now >= r.deadline]

    def admit(self, make_canvas: Callable[[Request], object]) -> list[Request]:
        """Move waiting requests into the batch, FIFO, within the budgets;
        make_canvas(r) -> the tokens of r's canvas row (if it raises, r is
        still the head of the queue). -> the newly admitted."""
        admitted = []
        tokens = sum(self.query_tokens(r) for r in self.running)
        while self.waiting:
            head = self.waiting[0]
            if self.running and (len(self.running) >= self.max_batch_size
                                 or tokens + head.canvas_len > self.max_num_batched_tokens):
                break
            if self.pool is not None and self.pool.pages_for(head.canvas_len) > self.pool.num_free:
                break
            tokens_of_head = make_canvas(head)  # may raise (device memory): the head stays waiting
            self.waiting.popleft()
            head.slot = self.canvas.allocate(tokens_of_head)
            if self.pool is not None:
                keys = head.prompt_page_keys(self.pool.page_size) if self.prefix_caching else []
                head.pages, hits = self.pool.allocate_prefix(head.canvas_len, keys)
                head.reuse_prefix(hits, self.pool.page_size)
            head.last_step = self._steps
            self.running.append(head)
            tokens += head.canvas_len
            admitted.append(head)
        return admitted

    def select(self) -> list[Request]:
        """The running rows that step now (within the token budget, longest
        waiting first, at least one), in ascending canvas row."""
        order = sorted(self.running, key=lambda r: r.last_step)  # stable: admission order among equals
        chosen, tokens = [], 0
        for r in order:
            cost = self.query_tokens(r)
            if chosen and tokens + cost > self.max_num_batched_tokens:
                continue
            chosen.append(r)
            tokens += cost
        self._steps += 1
        for r in chosen:
            r.last_step = self._steps
        return sorted(chosen, key=lambda r: r.slot)
