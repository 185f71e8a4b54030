"""Which requests run at the next denoising step.

Requests wait in arrival order and join the running batch between steps,
strictly first come first served: the head of the queue joins when the batch
has a free row (max_batch_size) and the padded batch still fits the token
budget (max_num_tokens, counted as rows x longest canvas, which is what the
forward computes over and the cache holds); nothing behind it overtakes it.
A batch that is empty always takes the head, whatever its size (add_request
refuses requests that could never fit).

Rows are kept compact (the running requests own rows 0..B-1 in order);
`compact` says which rows move after requests left.
"""

from __future__ import annotations

import collections

from dfastllm.engine.request import Request


class Scheduler:
    def __init__(self, *, max_batch_size: int, max_num_tokens: int):
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.live: dict[str, Request] = {}  # waiting or running, by id

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.live[request.request_id] = request

    def remove(self, request: Request) -> None:
        """Drop a request wherever it is (finished, aborted, expired, failed)."""
        del self.live[request.request_id]
        if request.slot >= 0:
            self.running.remove(request)
            request.slot = -1
        else:
            self.waiting.remove(request)

    def expired(self, now: float) -> list[Request]:
        """Live requests whose deadline has passed (not yet removed)."""
        return [r for r in self.live.values() if r.deadline is not None and now >= r.deadline]

    def admit(self) -> list[Request]:
        """Move waiting requests into the batch, FIFO, within the budgets;
        -> the newly admitted (their slots assigned after the running ones)."""
        admitted = []
        longest = max((r.canvas_len for r in self.running), default=0)
        while self.waiting:
            head = self.waiting[0]
            rows = len(self.running) + 1
            padded = rows * max(longest, head.canvas_len)
            if self.running and (rows > self.max_batch_size or padded > self.max_num_tokens):
                break
            self.waiting.popleft()
            head.slot = len(self.running)
            self.running.append(head)
            longest = max(longest, head.canvas_len)
            admitted.append(head)
        return admitted

    def compact(self) -> list[tuple[Request, int]]:
        """Give the running requests rows 0..B-1 in order; -> (request, old row)
        for each that moved, in ascending new row (safe to copy in that order)."""
        moved = []
        for row, request in enumerate(self.running):
            if request.slot != row:
                moved.append((request, request.slot))
                request.slot = row
        return moved
