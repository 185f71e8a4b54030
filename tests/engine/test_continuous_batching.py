"""Continuous batching: a request's tokens do not depend on the batch it runs
in (padding, joins between steps, aborts of its neighbours), budgets and
deadlines are honoured, and one failing step does not stop the engine."""

import time

import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore

from .conftest import generate, prompt, run_all

GREEDY = SamplingParams(max_tokens=16, block_length=8, steps=8, ignore_eos=True)


def _requests(params=GREEDY):
    return [("short", prompt(3), params), ("long", prompt(11, start=60), params),
            ("mid", prompt(6, start=120), SamplingParams(max_tokens=12, block_length=4, steps=6, ignore_eos=True))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kv_cache", ["none", "dual"])
def test_batched_equals_alone(family, kv_cache, request):
    assert_batched_equals_alone(request.getfixturevalue(family), kv_cache)


def assert_batched_equals_alone(loaded, kv_cache):
    """On `loaded`'s device (tests/engine/test_cuda.py runs it on a GPU)."""
    together = generate(loaded, _requests(), kv_cache=kv_cache)
    for rid, ids, params in _requests():
        alone = generate(loaded, [(rid, ids, params)], kv_cache=kv_cache)
        assert together[rid][0] == alone[rid][0], rid
        assert len(alone[rid][0]) == params.max_tokens
        assert together[rid][1].finish_reason == "length"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kv_cache", ["none", "prefix", "dual"])
def test_staggered_arrivals_and_cancellations_equal_alone(family, kv_cache, request):
    """Mixed prompt lengths joining at different steps, a neighbour cancelled
    mid-batch, and a step budget so small that requests wait to be admitted
    and, in the cached modes, rows wait a step when several start a block
    at once: every other request's tokens equal its tokens alone."""
    loaded = request.getfixturevalue(family)
    params = SamplingParams(max_tokens=8, block_length=4, steps=8, ignore_eos=True)
    arrivals = {0: [("a", prompt(5)), ("b", prompt(17, start=50))],
                2: [("c", prompt(3, start=90)), ("x", prompt(9, start=20))],
                5: [("d", prompt(11, start=130))]}
    core = EngineCore(loaded, kv_cache=kv_cache, max_num_batched_tokens=40)
    tokens, budget_used, waited = {}, [], []
    for step in range(200):
        for rid, ids in arrivals.get(step, []):
            core.add_request(rid, ids, params)
        if step == 4:
            assert core.abort("x")
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        budget_used.append(core.stats.last_step_query_tokens)
        waited.append(core.stats.last_step_rows < core.num_running)  # a running row sat this step out
        if step > 5 and not core.has_unfinished():
            break
    assert not core.has_unfinished() and max(budget_used) <= 40
    assert any(waited) == (kv_cache != "none")  # without a cache every row costs its canvas at every step
    for rid, ids in [r for group in arrivals.values() for r in group if r[0] != "x"]:
        alone = generate(loaded, [(rid, ids, params)], kv_cache=kv_cache)[rid][0]
        assert tokens[rid] == alone and len(alone) == 8, rid
    assert core.kv_pages_used == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kv_cache", ["none", "dual"])
def test_request_joins_between_steps(llada_gqa, kv_cache):
    core = EngineCore(llada_gqa, kv_cache=kv_cache)
    core.add_request("first", prompt(9), GREEDY)
    collected = {"first": []}
    for _ in range(3):
        for out in core.step():
            collected[out.request_id] += out.new_token_ids
    assert core.num_running == 1
    core.add_request("late", prompt(4, start=77), GREEDY)
    assert core.num_waiting == 1  # joins at the next step, not before
    rest = run_all(core)
    assert core.stats.last_step_rows in (1, 2)
    collected["first"] += rest["first"][0]
    alone_first = generate(llada_gqa, [("first", prompt(9), GREEDY)], kv_cache=kv_cache)
    alone_late = generate(llada_gqa, [("late", prompt(4, start=77), GREEDY)], kv_cache=kv_cache)
    assert collected["first"] == alone_first["first"][0]
    assert rest["late"][0] == alone_late["late"][0]


@pytest.mark.timeout(60)
def test_abort_frees_the_row_at_once(llada):
    core = EngineCore(llada, kv_cache="dual", max_batch_size=2)
    for rid, ids, params in _requests():
        core.add_request(rid, ids, params)
    core.step()
    assert (core.num_running, core.num_waiting) == (2, 1)
    assert core.abort("short")
    assert (core.num_running, core.num_waiting) == (1, 1)
    assert not core.abort("short")
    assert not core.abort("never-added")
    outputs = core.step()  # "mid" takes the freed row and is compacted beside "long"
    assert core.num_running == 2 and core.num_waiting == 0
    assert all(o.request_id != "short" for o in outputs)
    mid = [t for o in outputs if o.request_id == "mid" for t in o.new_token_ids]
    rest = run_all(core)
    alone = generate(llada, [r for r in _requests() if r[0] == "mid"], kv_cache="dual")
    assert mid + rest["mid"][0] == alone["mid"][0]
    assert "short" not in rest


@pytest.mark.timeout(60)
def test_abort_waiting_request(llada):
    core = EngineCore(llada, max_batch_size=1)
    core.add_request("a", prompt(4), GREEDY)
    core.add_request("b", prompt(4), GREEDY)
    core.step()
    assert core.abort("b")
    assert core.num_waiting == 0
    assert set(run_all(core)) == {"a"}


def test_admission_is_fifo_within_budgets(llada):
    params = SamplingParams(max_tokens=8, block_length=8, steps=2, ignore_eos=True)
    # kv_cache none: every step queries whole canvases of 12 tokens; 3 x 12 = 36 > 30, so only two fit.
    core = EngineCore(llada, max_batch_size=8, max_num_batched_tokens=30)
    for i in range(3):
        core.add_request(f"r{i}", prompt(4), params)
    core.step()
    assert (core.num_running, core.num_waiting) == (2, 1)
    assert core.stats.last_step_query_tokens == 24
    run_all(core)
    # A long head blocks a short request behind it: 10 + 32 tokens > 40.
    core = EngineCore(llada, max_batch_size=8, max_num_batched_tokens=40)
    core.add_request("small", prompt(2), params)  # 10 tokens
    core.add_request("big", prompt(24), params)  # 32 tokens
    core.add_request("tiny", prompt(1), params)  # 9 tokens: would fit, but waits its turn
    core.step()
    assert (core.num_running, core.num_waiting) == (1, 2)
    assert set(run_all(core)) == {"small", "big", "tiny"}
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        core.add_request("huge", prompt(40), params)  # 48 tokens could never run


@pytest.mark.timeout(60)
def test_deadline(llada):
    core = EngineCore(llada)
    core.add_request("late", prompt(4), GREEDY, deadline=time.monotonic() - 1.0)
    out, = core.step()
    assert (out.request_id, out.finish_reason, out.num_steps) == ("late", "abort", 0)
    assert "deadline" in out.error
    core.add_request("running", prompt(4), GREEDY, deadline=time.monotonic() + 0.2)
    core.add_request("patient", prompt(5), GREEDY)
    core.step()
    time.sleep(0.25)
    outputs = core.step()
    expired = [o for o in outputs if o.request_id == "running"]
    assert expired and expired[0].finish_reason == "abort"
    assert core.num_running == 1
    assert run_all(core)["patient"][1].finish_reason == "length"


@pytest.mark.timeout(60)
def test_seeded_sampling_is_batch_independent(llada):
    hot = SamplingParams(max_tokens=16, block_length=8, steps=8, temperature=0.9, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=12, block_length=4, steps=12, temperature=1.0, seed=99, ignore_eos=True)
    alone = generate(llada, [("x", prompt(5), hot)])["x"][0]
    batched = generate(llada, [("y", prompt(9, start=70), other), ("x", prompt(5), hot)],
                       kv_cache="none")["x"][0]
    assert batched == alone
    greedy = generate(llada, [("x", prompt(5), GREEDY)])["x"][0]
    reseeded = SamplingParams(max_tokens=16, block_length=8, steps=8, temperature=0.9, seed=4321,
                              ignore_eos=True)
    # Sampling at t > 0 is not greedy, and the seed matters.
    assert alone != greedy or generate(llada, [("x", prompt(5), reseeded)])["x"][0] != alone


@pytest.mark.timeout(60)
def test_unseeded_requests_follow_the_engine_seed(llada):
    hot = SamplingParams(max_tokens=8, block_length=8, steps=4, temperature=1.0, ignore_eos=True)
    a = generate(llada, [("x", prompt(5), hot)], seed=7)["x"][0]
    b = generate(llada, [("x", prompt(5), hot)], seed=7)["x"][0]
    assert a == b


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kv_cache", ["none", "prefix"])
def test_eos_early_stop(llada, kv_cache):
    params = SamplingParams(max_tokens=32, block_length=8, steps=16, ignore_eos=True)
    full, last = generate(llada, [("x", prompt(6), params)], kv_cache=kv_cache)["x"]
    # Stop at a token that first appears in the second block: the output ends
    # before it, and the request ends at that block instead of running to 32.
    stop_at = next(i for i in range(8, 32) if full[i] not in full[:i])
    stop = SamplingParams(max_tokens=32, block_length=8, steps=16, ignore_eos=True,
                          stop_token_ids=(full[stop_at],))
    tokens, out = generate(llada, [("x", prompt(6), stop)], kv_cache=kv_cache)["x"]
    assert tokens == full[:stop_at]
    assert out.finish_reason == "stop" and out.num_generated_tokens == stop_at
    assert out.num_steps < last.num_steps
    # Without ignore_eos the model's EOS and end of turn stop it too.
    ends = {llada.eos_token_id, llada.eot_token_id, full[stop_at]}
    first_end = next(i for i, t in enumerate(full) if t in ends)
    eos_params = SamplingParams(max_tokens=32, block_length=8, steps=16, stop_token_ids=(full[stop_at],))
    assert generate(llada, [("x", prompt(6), eos_params)], kv_cache=kv_cache)["x"][0] == full[:first_end]


@pytest.mark.timeout(60)
def test_tokens_stream_as_the_prefix_commits(llada):
    params = SamplingParams(max_tokens=16, block_length=4, steps=16, ignore_eos=True)
    core = EngineCore(llada)
    core.add_request("x", prompt(5), params)
    chunks = []
    while core.has_unfinished():
        for out in core.step():
            chunks.append((out.num_steps, out.new_token_ids))
    assert len(chunks) >= 4  # at least once per block, before the request ends
    assert chunks[0][0] <= 4
    assert sum(len(c) for _, c in chunks) == 16


@pytest.mark.timeout(60)
def test_failed_step_fails_its_requests_and_the_engine_goes_on(llada, monkeypatch):
    core = EngineCore(llada, kv_cache="dual")
    core.add_request("a", prompt(4), GREEDY)
    core.add_request("b", prompt(7), GREEDY)
    core.step()
    model = llada.model

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(model, "forward_packed", out_of_memory)
    outputs = core.step()
    assert {o.request_id: o.finish_reason for o in outputs} == {"a": "error", "b": "error"}
    assert all("out of memory" in o.error for o in outputs)
    assert not core.has_unfinished() and core.stats.requests_failed == 2
    monkeypatch.undo()
    core.add_request("a", prompt(4), GREEDY)  # the id is free again
    tokens, out = run_all(core)["a"]
    assert out.finish_reason == "length"
    assert tokens == generate(llada, [("a", prompt(4), GREEDY)], kv_cache="dual")["a"][0]


def test_bad_input(llada):
    core = EngineCore(llada, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        core.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        core.add_request("a", prompt(60), GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        core.add_request("a", [5, llada.config.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        core.add_request("a", [-1, 5], GREEDY)
    core.add_request("a", prompt(4), GREEDY)
    with pytest.raises(ValueError, match="already"):
        core.add_request("a", prompt(4), GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        EngineCore(llada, max_model_len=llada.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="kv_cache"):
        EngineCore(llada, kv_cache="paged")
    assert core.num_waiting == 1


@pytest.mark.timeout(60)
def test_warmup_and_counters(llada):
    core = EngineCore(llada, kv_cache="dual", max_batch_size=4)
    core.warmup(prompt_len=8, block_length=8, batch_sizes=(1, 2))
    assert not core.has_unfinished() and core.stats.steps == 0 and core.drain_queue_times() == []
    results = generate(llada, _requests(), kv_cache="dual")  # reference tokens
    for rid, ids, params in _requests():
        core.add_request(rid, ids, params)
    assert run_all(core) == results  # warm-up left no trace in the outputs
    s = core.stats
    assert s.steps == 8 and s.requests_finished == 3
    assert s.tokens_committed == 16 + 16 + 12
    assert s.rows_stepped == 8 + 8 + 6 and s.tokens_per_step == pytest.approx(44 / 22)
    assert len(core.drain_queue_times()) == 3 and core.drain_queue_times() == []
