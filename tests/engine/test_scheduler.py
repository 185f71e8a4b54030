"""The Scheduler on its own, over real CanvasRows, PagePool and Requests
(CPU, a few KB): FIFO admission within the three budgets (canvas rows,
query tokens, KV pages), no overtaking, pages and rows back at once on
remove, deadlines, a failed canvas write, and which running rows step when
their next steps exceed the token budget.

A step is simulated with the request's own `apply_step`: committing a whole
block (a full forward follows) or nothing (a cached step follows), so the
query cost of each row is what the engine's `query_extent` says."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from dfastllm.engine.batch import query_extent
from dfastllm.engine.kv_cache import CanvasRows, PagePool
from dfastllm.engine.request import Request
from dfastllm.engine.scheduler import Scheduler
from dfastllm.sampling_params import SamplingParams

MASK_ID = 5
PAD_ID = 1
TOKEN = 60  # an ordinary token, neither mask nor stop
PAGE_SIZE = 4


def request(rid: str, prompt_len: int = 8, max_tokens: int = 8, *, block_length: int | None = None,
            deadline: float | None = None) -> Request:
    """As EngineCore.add_request builds one (LLaDA, no stop ids)."""
    params = SamplingParams(max_tokens=max_tokens, block_length=block_length, ignore_eos=True)
    prompt = [40 + i for i in range(prompt_len)]
    return Request(rid, prompt, params, seed=0, mask_id=MASK_ID, stop_ids=frozenset(), deadline=deadline,
                   arrival=time.monotonic())


def scheduler(*, rows: int = 4, tokens: int = 1024, pages: int | None = None) -> Scheduler:
    """Query costs as in kv_cache dual; pages: KV pages requests can hold
    (None: no pool, only rows and tokens bound admission)."""
    canvas = CanvasRows(rows=rows, columns=64, fill_id=PAD_ID, device=torch.device("cpu"))
    pool = None if pages is None else PagePool(n_layers=1, n_kv_heads=1, head_dim=2, dtype=torch.float32,
                                               device=torch.device("cpu"), page_size=PAGE_SIZE,
                                               num_pages=pages + 1)
    return Scheduler(max_batch_size=rows, max_num_batched_tokens=tokens, canvas=canvas, pool=pool,
                     query_tokens=query_tokens)


def query_tokens(r: Request) -> int:
    start, end = query_extent(r, "dual", 0)
    return end - start


def canvas_of(r: Request) -> torch.Tensor:
    return torch.tensor(r.prompt_ids + [MASK_ID] * r.gen_len, dtype=torch.long)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def step_request(r: Request, *, commit: bool) -> None:
    """One step of r: commit its whole current block, or nothing."""
    positions = r.masked_positions()
    r.apply_step(positions, np.full(len(positions), TOKEN if commit else MASK_ID, dtype=np.int64))


# ---- admission ---------------------------------------------------------------
def test_admission_is_fifo_within_the_canvas_rows():
    s = scheduler(rows=3)
    reqs = [request(f"r{i}") for i in range(5)]
    for r in reqs:
        s.add(r)
    assert ids(s.admit(canvas_of)) == ["r0", "r1", "r2"]
    assert [r.slot for r in reqs] == [0, 1, 2, -1, -1]
    assert ids(s.waiting) == ["r3", "r4"]
    assert s.canvas.num_free == 0
    # The prompt and masks are in the row, the rest of it untouched.
    row = s.canvas.canvas[1]
    assert row[:16].tolist() == reqs[1].prompt_ids + [MASK_ID] * 8
    assert (row[16:] == PAD_ID).all()
    assert s.admit(canvas_of) == []  # no free row

    s.remove(reqs[1])  # row 1 back at once: the next in line takes it
    assert reqs[1].slot == -1 and s.canvas.num_free == 1
    assert ids(s.admit(canvas_of)) == ["r3"] and reqs[3].slot == 1
    assert ids(s.waiting) == ["r4"]
    assert set(s.live) == {"r0", "r2", "r3", "r4"}


def test_a_big_head_is_not_overtaken_by_a_small_request_behind_it():
    # Token budget 40: a running 16-token canvas leaves 24; the head wants 32,
    # the small one behind it 12, which would fit but must wait its turn.
    s = scheduler(tokens=40)
    running, big, small = request("running"), request("big", 16, 16), request("small", 4, 8)
    s.add(running)
    assert ids(s.admit(canvas_of)) == ["running"]
    s.add(big)
    s.add(small)
    assert s.admit(canvas_of) == []
    assert ids(s.waiting) == ["big", "small"] and big.slot == small.slot == -1
    # Once the running request's next step is a cached one (its one block of
    # 8 tokens), 8 + 32 fits: the head goes first, and the small one no longer fits.
    step_request(running, commit=False)
    assert s.query_tokens(running) == 8
    assert ids(s.admit(canvas_of)) == ["big"]
    assert ids(s.waiting) == ["small"]
    s.remove(running)
    assert ids(s.admit(canvas_of)) == []  # 32 (big, still at its full step) + 12 > 40
    step_request(big, commit=False)
    assert ids(s.admit(canvas_of)) == ["small"]


def test_the_page_budget_blocks_admission_until_a_remove_frees_pages():
    # 8 pages of 4 tokens; a 16-token canvas holds 4 pages.
    s = scheduler(rows=4, pages=8)
    a, b, c, d = request("a"), request("b"), request("c"), request("d", 2, 2)  # d: 1 page
    for r in (a, b, c, d):
        s.add(r)
    assert ids(s.admit(canvas_of)) == ["a", "b"]
    assert len(a.pages) == len(b.pages) == 4 and not set(a.pages) & set(b.pages)
    assert 0 not in a.pages + b.pages  # the scratch page is never handed out
    assert s.pool.num_free == 0
    assert s.admit(canvas_of) == []  # a free row, but no pages: c waits, and d behind it
    assert ids(s.waiting) == ["c", "d"] and c.pages == [] and s.canvas.num_free == 2

    a_pages = list(a.pages)
    s.remove(a)
    assert a.pages == [] and a.slot == -1 and s.pool.num_free == 4
    assert ids(s.admit(canvas_of)) == ["c"]
    assert c.pages == a_pages  # the same pages, in the same order
    assert s.pool.num_free == 0 and ids(s.waiting) == ["d"]

    s.remove(d)  # a waiting request leaves without touching rows or pages
    assert not s.waiting and "d" not in s.live
    assert s.pool.num_free == 0 and s.canvas.num_free == 2
    s.remove(b)
    s.remove(c)
    assert s.pool.num_free == 8 and s.canvas.num_free == 4 and not s.running and not s.live


def test_a_make_canvas_that_raises_leaves_the_head_waiting():
    s = scheduler(rows=4, pages=9)
    first, second, third = request("first"), request("second"), request("third", 2, 2)
    for r in (first, second, third):
        s.add(r)

    def out_of_memory_for_second(r):
        if r is second:
            raise RuntimeError("out of device memory")
        return canvas_of(r)

    with pytest.raises(RuntimeError, match="out of device memory"):
        s.admit(out_of_memory_for_second)
    # `first` got in before the failure and keeps its row and pages; `second`
    # holds nothing and is still the head, `third` still behind it.
    assert ids(s.running) == ["first"] and first.slot == 0 and len(first.pages) == 4
    assert ids(s.waiting) == ["second", "third"]
    assert second.slot == -1 and second.pages == []
    assert s.canvas.num_free == 3 and s.pool.num_free == 5
    assert ids(s.admit(canvas_of)) == ["second", "third"]
    assert second.slot == 1 and third.slot == 2 and s.pool.num_free == 0


def test_remove_and_expired_cover_waiting_and_running_requests():
    s = scheduler(rows=1)
    soon, never, later = request("soon", deadline=5.0), request("never"), request("later", deadline=10.0)
    for r in (soon, never, later):
        s.add(r)
    assert ids(s.admit(canvas_of)) == ["soon"]  # running; the others wait
    assert s.expired(4.9) == []
    assert ids(s.expired(5.0)) == ["soon"]
    assert ids(s.expired(10.0)) == ["soon", "later"]
    for r in s.expired(10.0):
        s.remove(r)
    assert set(s.live) == {"never"} and ids(s.waiting) == ["never"] and s.expired(1e9) == []
    assert ids(s.admit(canvas_of)) == ["never"]


# ---- which running rows step ---------------------------------------------------
def test_select_returns_rows_in_ascending_canvas_row_within_the_budget():
    s = scheduler(rows=4, tokens=64)
    reqs = [request(f"r{i}") for i in range(4)]  # 16-token canvases
    for r in reqs:
        s.add(r)
    assert ids(s.admit(canvas_of)) == ["r0", "r1", "r2", "r3"]  # 4 x 16 = 64 fits
    s.remove(reqs[0])
    late = request("late")
    s.add(late)
    s.admit(canvas_of)
    assert late.slot == 0  # admitted last, in the lowest row
    chosen = s.select()
    assert ids(chosen) == ["late", "r1", "r2", "r3"]  # by canvas row, not admission order
    assert [r.slot for r in chosen] == [0, 1, 2, 3]


def test_rows_that_all_want_a_full_step_take_turns():
    """Blocks of 2 tokens, each step committing the whole block: every step
    of these rows is a block's first, a full 16-token step, and the budget
    holds two. The row left out goes first at the next step, so the three
    take turns and none waits two steps in a row (picked in admission order,
    c would wait until a and b had finished)."""
    s = scheduler(rows=4, tokens=32)
    a, b, c = (request(rid, 8, 8, block_length=2) for rid in "abc")
    for r in (a, b, c):
        s.add(r)
    assert ids(s.admit(canvas_of)) == ["a", "b"]
    for r in s.select():
        step_request(r, commit=False)  # a cached step (2 tokens) follows
    assert ids(s.admit(canvas_of)) == ["c"]  # 2 + 2 + 16 fits
    assert ids(s.select()) == ["a", "b", "c"]
    for r in (a, b, c):
        step_request(r, commit=True)
    assert [s.query_tokens(r) for r in (a, b, c)] == [16, 16, 16]

    chosen = []
    while s.running:
        step = s.select()
        chosen.append("".join(ids(step)))
        for r in step:
            step_request(r, commit=True)
            if r.finish_reason is not None:
                s.remove(r)
    # Each has 3 of its 4 blocks left: 9 row-steps, two a step while two fit.
    assert chosen == ["ab", "ac", "ab", "bc", "c"]


def test_the_token_budget_splits_the_rows_and_none_starves():
    """Ten requests through six rows in dual mode (8-token prompt, 16 tokens
    in blocks of 4: a full step costs 24, a cached one 4) under a 40-token
    budget, each step ending a row's block at random. Rows that start a
    block together want more than the budget; the longest waiting go first.
    Over the run no step exceeds the budget, every running row steps at
    least once in any `len(running)` steps, and all finish."""
    budget, rows = 40, 6
    s = scheduler(rows=rows, tokens=budget, pages=64)
    for i in range(10):
        s.add(request(f"r{i}", 8, 16, block_length=4))
    rng = random.Random(0)
    last_stepped: dict[str, int] = {}
    split_steps = 0
    finished = []
    for step in range(200):
        if not s.live:
            break
        s.admit(canvas_of)
        running = list(s.running)
        for r in running:
            last_stepped.setdefault(r.request_id, step - 1)  # admitted now: its clock starts
        chosen = s.select()
        assert chosen, "at least one row steps"
        assert [r.slot for r in chosen] == sorted(r.slot for r in chosen)
        assert sum(s.query_tokens(r) for r in chosen) <= budget
        if len(chosen) < len(running):
            split_steps += 1
        for r in running:
            if r in chosen:
                last_stepped[r.request_id] = step
            assert step - last_stepped[r.request_id] < len(running), f"{r.request_id} starved at step {step}"
        for r in chosen:
            step_request(r, commit=rng.random() < 0.4)  # a block ends after one or more steps
            if r.finish_reason is not None:
                s.remove(r)
                finished.append(r.request_id)
    assert sorted(finished) == sorted(f"r{i}" for i in range(10))
    assert split_steps >= 5  # the budget really did split the batch
    assert s.pool.num_free == 64 and s.canvas.num_free == rows
