"""Preparing the next step's inputs while the current step runs (EngineCore,
`prepare_ahead`) changes no token: every family's schedule (LLaDA2's too),
every cache mode,
greedy, sampled and threshold decoding, with requests joining, finishing
blocks at different steps and being cancelled between steps. A step
prepared ahead lists as candidates the cells masked before the step in
flight (a superset), so these tests also hold that extra candidates are
never committed twice and never counted as new."""

import pytest

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_llada, write_tiny_llada2

from .conftest import prompt, run_all

# Blocks of 4 and 3 tokens end at different steps; one request's steps are
# uneven (2 per block of 3: counts 2, 1), one commits a block per step.
SCHEDULES = {
    "greedy": [SamplingParams(max_tokens=12, block_length=4, steps=12, temperature=0.0, ignore_eos=True),
               SamplingParams(max_tokens=9, block_length=3, steps=6, temperature=0.0, ignore_eos=True),
               SamplingParams(max_tokens=8, block_length=4, steps=2, temperature=0.0, ignore_eos=True)],
    "sampled": [SamplingParams(max_tokens=12, block_length=4, steps=12, temperature=0.9, top_p=0.9, seed=3,
                               ignore_eos=True),
                SamplingParams(max_tokens=9, block_length=3, steps=6, temperature=0.7, top_k=20, seed=4,
                               ignore_eos=True),
                SamplingParams(max_tokens=8, block_length=4, steps=4, temperature=1.0, seed=5, ignore_eos=True)],
    # Threshold steps take as many cells as pass it: the engine predicts the
    # block goes on, and drops what it prepared when the block ends sooner.
    # The first: fewer steps than a block has tokens, which a threshold block may outlast.
    "threshold": [SamplingParams(max_tokens=12, block_length=4, steps=3, threshold=0.05, temperature=0.0,
                                 ignore_eos=True),
                  SamplingParams(max_tokens=9, block_length=3, threshold=0.5, temperature=0.0, ignore_eos=True),
                  SamplingParams(max_tokens=8, block_length=8, threshold=0.2, temperature=0.6, seed=9,
                                 ignore_eos=True),
                  # No block_length: Dream decodes the whole canvas as one block.
                  SamplingParams(max_tokens=10, threshold=0.1, temperature=0.0, ignore_eos=True)],
}


def _drive(loaded, schedule, *, kv_cache, prepare_ahead):
    """Arrivals over several steps and a cancellation between steps; -> tokens per request, stats."""
    arrivals = {0: ["a", "b"], 2: ["c", "x"], 3: ["d"], 4: ["e"]}
    starts = {"a": 40, "b": 90, "c": 130, "x": 20, "d": 60, "e": 100}
    lengths = {"a": 5, "b": 11, "c": 3, "x": 7, "d": 9, "e": 4}
    core = EngineCore(loaded, kv_cache=kv_cache, max_batch_size=4, prepare_ahead=prepare_ahead)
    tokens, finish = {}, {}
    for step in range(400):
        for i, rid in enumerate(arrivals.get(step, [])):
            core.add_request(rid, prompt(lengths[rid], start=starts[rid]), schedule[(step + i) % len(schedule)])
        if step == 3:  # "x" has run one step
            assert core.abort("x")
        for out in core.step():
            assert out.finish_reason != "error", out.error
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            finish[out.request_id] = (out.finish_reason, out.num_generated_tokens, out.num_steps)
        if step > 3 and not core.has_unfinished():
            break
    assert not core.has_unfinished()
    return tokens, finish, core.stats


@pytest.mark.timeout(180)
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_prepared_steps_give_the_same_tokens(family, schedule, request):
    loaded = request.getfixturevalue(family)
    for kv_cache in ("none", "prefix", "dual"):
        ahead = _drive(loaded, SCHEDULES[schedule], kv_cache=kv_cache, prepare_ahead=True)
        plain = _drive(loaded, SCHEDULES[schedule], kv_cache=kv_cache, prepare_ahead=False)
        assert ahead[:2] == plain[:2], kv_cache
        assert plain[2].steps_prepared_ahead == 0
        # In top-k mode most steps ran on inputs prepared ahead (not the first,
        # nor those after a join, an abort or a finish); threshold steps only
        # where no block ended sooner than predicted.
        least = 1 if schedule == "threshold" else ahead[2].steps // 2
        assert ahead[2].steps_prepared_ahead >= least, (kv_cache, ahead[2].steps_prepared_ahead, ahead[2].steps)
        # Every generated cell was counted once, extra candidates included.
        finished = {rid: f for rid, f in ahead[1].items() if f[0] == "length"}
        assert ahead[2].tokens_committed == plain[2].tokens_committed >= sum(n for _, n, _ in finished.values())
        assert (ahead[2].steps, ahead[2].rows_stepped) == (plain[2].steps, plain[2].rows_stepped)


@pytest.fixture(scope="module")
def fairly_confident_llada(tmp_path_factory):
    """Peaked enough that a threshold step sometimes takes a whole block at once."""
    return load_model(write_tiny_llada(tmp_path_factory.mktemp("llada_fairly_confident"), seed=14, head_scale=5.0))


@pytest.mark.timeout(60)
def test_threshold_blocks_that_end_early_drop_the_prepared_step(fairly_confident_llada):
    """Threshold blocks that end sooner than predicted: those predictions are
    dropped (fewer steps prepared than ran), and the tokens are still the
    unprepared engine's."""
    params = SamplingParams(max_tokens=16, block_length=8, threshold=0.3, temperature=0.0, ignore_eos=True)
    runs = {}
    for prepare_ahead in (True, False):
        core = EngineCore(fairly_confident_llada, kv_cache="dual", prepare_ahead=prepare_ahead)
        core.add_request("r", prompt(6), params)
        tokens, commits = [], []
        while core.has_unfinished():
            tokens += [t for out in core.step() for t in out.new_token_ids]
            commits.append(core.stats.last_step_tokens_committed)
        runs[prepare_ahead] = tokens, commits, core.stats
    (tokens, commits, stats), (plain_tokens, plain_commits, _) = runs[True], runs[False]
    assert (tokens, commits) == (plain_tokens, plain_commits) and len(tokens) == sum(commits) == 16
    assert max(commits) > 1, commits  # some step took several cells: a block ended early
    assert 0 < stats.steps_prepared_ahead < stats.steps - 1, (commits, stats.steps_prepared_ahead)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin", "origin"])
def test_dream_whole_canvas_top_k(dream, alg):
    """Dream's own decoding in top-k mode takes exactly the count it planned,
    so the next count is planned ahead from the cells that leaves (Dream's
    schedule skips steps that would commit none); `origin` draws it from a
    copy of its generator, and the request later draws the same."""
    params = SamplingParams(max_tokens=12, steps=9, temperature=0.5, seed=7, alg=alg, alg_temp=0.3 if alg == "entropy"
                            else None, ignore_eos=True)  # whole canvas, top-k
    runs = {}
    for prepare_ahead in (True, False):
        core = EngineCore(dream, prepare_ahead=prepare_ahead)
        for i in range(2):
            core.add_request(f"r{i}", prompt(5 + 3 * i, start=30 + 50 * i), params)
        runs[prepare_ahead] = run_all(core), core.stats
    (ahead, stats), (plain, plain_stats) = runs[True], runs[False]
    assert {r: t for r, (t, _) in ahead.items()} == {r: t for r, (t, _) in plain.items()}
    assert stats.steps == plain_stats.steps > 2 and stats.tokens_committed == 24
    assert stats.steps_prepared_ahead == stats.steps - 1  # all but the first


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    """A peaked head (as tests/engine/test_llada2_engine.py): cells cross the thresholds."""
    return load_model(write_tiny_llada2(tmp_path_factory.mktemp("llada2_ahead"), seed=5, head_scale=12.0))


@pytest.mark.timeout(120)
def test_llada2_prepared_steps_give_the_same_tokens(llada2):
    """The 2.0 rule (threshold with a per-step share), greedy and sampled,
    prompts on and off a block boundary, the block cache (its forward starts
    at the block before when one just ended), recomputed blocks (kv_cache
    none) and prefix caching: the same tokens prepared ahead or not."""
    schedule = [SamplingParams(max_tokens=12, block_length=4, temperature=0.0, threshold=0.9),
                SamplingParams(max_tokens=10, block_length=4, steps=2, temperature=0.8, top_k=30, seed=2,
                               threshold=0.6),
                SamplingParams(max_tokens=9, block_length=4, temperature=0.0, threshold=0.99)]
    for kv_cache in ("dual", "none"):
        ahead = _drive(llada2, schedule, kv_cache=kv_cache, prepare_ahead=True)
        plain = _drive(llada2, schedule, kv_cache=kv_cache, prepare_ahead=False)
        assert ahead[:2] == plain[:2], kv_cache
        assert ahead[2].steps_prepared_ahead > 0 and ahead[2].tokens_committed == plain[2].tokens_committed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_post_steps", [0, 3])
def test_llada2_editing_prepared_steps_give_the_same_tokens(llada2, max_post_steps):
    """2.1's editing: the mask phase is prepared (the block goes on into its
    post steps, or ends when the last mask goes and none are allowed); a
    post step's end depends on what it edits, so the step after it is built
    after the read."""
    params = SamplingParams(max_tokens=12, block_length=4, temperature=0.0, threshold=0.9, editing_threshold=0.5,
                            max_post_steps=max_post_steps)
    runs = {}
    for prepare_ahead in (True, False):
        core = EngineCore(llada2, prepare_ahead=prepare_ahead)
        for i in range(2):
            core.add_request(f"r{i}", prompt(6 + 3 * i, start=40 + 20 * i), params)
        runs[prepare_ahead] = {r: (t, o.finish_reason) for r, (t, o) in run_all(core).items()}, core.stats
    (ahead, stats), (plain, plain_stats) = runs[True], runs[False]
    assert ahead == plain and stats.steps == plain_stats.steps > 3
    assert 0 < stats.steps_prepared_ahead < stats.steps - 1
