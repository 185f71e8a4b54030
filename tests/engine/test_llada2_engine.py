"""LLaDA2 through EngineCore: at temperature 0 the engine reproduces the
published generate (tests/models/llada2_reference.py) token for token, with
the LLaDA2.0 threshold rule and LLaDA2.1's token editing, for prompts that do
and do not end on a block boundary, with the exact block cache on (the
family's default); batched equals alone; the cache equals recomputing every
block at every step (kv_cache none) and computes each finished block once;
an editing request's text comes out only at block ends."""

import os
import sys

import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.engine.llada2_decoding import filter_logits
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_llada, write_tiny_llada2

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from llada2_reference import ReferenceLLaDA2, top_k_logits, top_p_logits  # noqa: E402

from .conftest import prompt  # noqa: E402

pytestmark = pytest.mark.timeout(120)

BLOCK, GEN = 4, 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A peaked head (head_scale 12): confident cells cross the thresholds."""
    return write_tiny_llada2(tmp_path_factory.mktemp("llada2_engine"), seed=5, head_scale=12.0)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return ReferenceLLaDA2(checkpoint)


def run(loaded, requests: dict, kv_cache="auto", max_batch_size=8):
    """{id: (prompt, params)} all added at once -> {id: (tokens, finish_reason, outputs)}."""
    core = EngineCore(loaded, kv_cache=kv_cache, max_batch_size=max_batch_size)
    for rid, (ids, params) in requests.items():
        core.add_request(rid, ids, params)
    results = {rid: ([], None, []) for rid in requests}
    while core.has_unfinished():
        for o in core.step():
            tokens, _, outputs = results[o.request_id]
            results[o.request_id] = (tokens + o.new_token_ids, o.finish_reason, outputs + [o])
    return results


def expected(reference_tokens, loaded):
    """The engine's answer for the reference's: the tokens before the first
    EOS or end of turn (the engine stops at either; the published code at EOS)."""
    stops = [i for i, t in enumerate(reference_tokens) if t in (loaded.eos_token_id, loaded.eot_token_id)]
    return reference_tokens[:stops[0]] if stops else reference_tokens


def stopped(reference_tokens, loaded):
    return len(expected(reference_tokens, loaded)) < len(reference_tokens)


THRESHOLD_CASES = [  # (prompt length, steps per block, threshold)
    (5, 4, 0.95),   # the first answer block holds the prompt's last token
    (8, 4, 0.95),   # the prompt ends on a block boundary
    (11, 2, 0.95),  # two cells per step
    (5, 4, 0.3),    # low threshold: several cells per step, an early EOS
]


@pytest.mark.parametrize("n_prompt, steps, threshold", THRESHOLD_CASES)
def test_threshold_rule_matches_published_generate(loaded, reference, n_prompt, steps, threshold):
    ids = prompt(n_prompt)
    ref = reference.generate(ids, gen_length=GEN, block_length=BLOCK, steps=steps, threshold=threshold,
                             mask_id=loaded.mask_token_id, eos_id=loaded.eos_token_id)
    params = SamplingParams(max_tokens=GEN, block_length=BLOCK, steps=steps, threshold=threshold)
    tokens, finish, _ = run(loaded, {"a": (ids, params)})["a"]
    assert tokens == expected(ref, loaded)
    assert finish == ("stop" if stopped(ref, loaded) else "length")


@pytest.mark.parametrize("n_prompt, threshold, editing_threshold, max_post_steps", [
    (5, 0.5, 0.0, 3), (8, 0.2, 0.1, 2), (11, 0.5, 0.3, 0), (6, 0.9, 0.5, 5)])
def test_editing_rule_matches_published_generate(loaded, reference, n_prompt, threshold, editing_threshold,
                                                 max_post_steps):
    ids = prompt(n_prompt)
    reference.edits = 0
    ref = reference.generate_editing(ids, gen_length=GEN, block_length=BLOCK, threshold=threshold,
                                     editing_threshold=editing_threshold, max_post_steps=max_post_steps,
                                     mask_id=loaded.mask_token_id, eos_id=loaded.eos_token_id)
    assert reference.edits > 0 or max_post_steps == 0  # the case exercises editing (0: the bound alone)
    params = SamplingParams(max_tokens=GEN, block_length=BLOCK, threshold=threshold,
                            editing_threshold=editing_threshold, max_post_steps=max_post_steps)
    tokens, _, outputs = run(loaded, {"a": (ids, params)})["a"]
    assert tokens == expected(ref, loaded)
    # Text comes out only when a block ends: every emitted prefix ends on a block end (or the answer's end).
    emitted = 0
    for o in outputs:
        emitted += len(o.new_token_ids)
        if o.new_token_ids and o.finish_reason is None:
            assert (n_prompt + emitted) % BLOCK == 0


MIXED = {  # prompts on and off block boundaries, both rules, different shares per step
    "a": (prompt(5), SamplingParams(max_tokens=GEN, block_length=BLOCK, steps=4, threshold=0.95)),
    "b": (prompt(8, start=60), SamplingParams(max_tokens=8, block_length=BLOCK, steps=2, threshold=0.3)),
    "c": (prompt(11, start=80), SamplingParams(max_tokens=GEN, block_length=BLOCK, threshold=0.5,
                                               editing_threshold=0.2, max_post_steps=3)),
    "d": (prompt(3, start=90), SamplingParams(max_tokens=10, block_length=8, steps=8, threshold=0.8)),
}


def test_batched_equals_alone(loaded):
    together = run(loaded, MIXED)
    for rid, request in MIXED.items():
        alone = run(loaded, {rid: request})[rid]
        assert together[rid][:2] == alone[:2], rid


def test_block_cache_is_exact(loaded):
    """The exact block cache (auto: dual for this family) gives exactly the
    tokens of recomputing blocks 0..current at every step (kv_cache none,
    the published generate's compute), batched and alone."""
    cached = {k: v[:2] for k, v in run(loaded, MIXED).items()}
    assert cached == {k: v[:2] for k, v in run(loaded, MIXED, kv_cache="none").items()}
    assert cached == {k: v[:2] for k, v in run(loaded, MIXED, kv_cache="prefix").items()}


@pytest.mark.parametrize("n_prompt", [5, 8])
def test_each_step_computes_only_the_current_block(loaded, n_prompt):
    """Query tokens per step: the first step computes the prompt's blocks with
    the first answer block; later steps only the current block, except a
    block's first step, which also computes the block that just ended, once
    (its last commit came after its last forward). kv_cache none recomputes
    blocks 0..current at every step."""
    # The answer ends on a block end, so every block runs all its steps.
    params = SamplingParams(max_tokens=16 - n_prompt, block_length=BLOCK, steps=BLOCK, threshold=1.0,
                            ignore_eos=True)
    for kv_cache in ("dual", "none"):
        core = EngineCore(loaded, kv_cache=kv_cache)
        core.add_request("a", prompt(n_prompt), params)
        request = core.scheduler.live["a"]
        seen = []  # (block, step in block, query tokens)
        while core.has_unfinished():
            block, block_step = request.block, request.block_step
            core.step()
            seen.append((block, block_step, core.stats.last_step_query_tokens))
        first_block = n_prompt // BLOCK
        answer_cells = [min(BLOCK, (b + 1) * BLOCK - n_prompt) for b in range(first_block, request.canvas_len // BLOCK)]
        assert [b for b, _, _ in seen] == [first_block + i for i, n in enumerate(answer_cells)
                                           for _ in range(n)]  # threshold 1.0: one cell per step
        for block, block_step, tokens in seen:
            block_end = (block + 1) * BLOCK
            if kv_cache == "none":
                assert tokens == block_end
            elif block == first_block and block_step == 0:
                assert tokens == block_end  # the prompt's blocks and the first answer block
            else:
                assert tokens == (2 * BLOCK if block_step == 0 else BLOCK)


def test_generation_config_gives_the_defaults(tmp_path, reference, loaded):
    directory = write_tiny_llada2(tmp_path, seed=5, head_scale=12.0, generation_config={
        "threshold": 0.5, "editing_threshold": 0.2, "max_post_steps": 2, "block_length": BLOCK})
    with_defaults = load_model(directory)
    ids = prompt(7)
    implicit = run(with_defaults, {"a": (ids, SamplingParams(max_tokens=GEN))})["a"][0]
    explicit = run(loaded, {"a": (ids, SamplingParams(max_tokens=GEN, block_length=BLOCK, threshold=0.5,
                                                      editing_threshold=0.2, max_post_steps=2))})["a"][0]
    assert implicit == explicit
    ref = reference.generate_editing(ids, gen_length=GEN, block_length=BLOCK, threshold=0.5, editing_threshold=0.2,
                                     max_post_steps=2, mask_id=loaded.mask_token_id, eos_id=loaded.eos_token_id)
    assert implicit == expected(ref, loaded)


def test_sampling_filters_follow_the_published_order():
    """temperature, then top-k, then top-p, row by row, as the published
    _sample_with_temperature_topk_topp; temperature 0 filters nothing."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 301, generator=gen) * 3
    temperature = torch.tensor([0.7, 1.0, 1.5, 0.0, 0.5, 1.0])
    top_k = torch.tensor([5, 0, 40, 3, 0, 1])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.5, 0.95, 1.0])
    got = filter_logits(logits, temperature, top_k, top_p)
    for i in range(6):
        row = logits[i:i + 1]
        if temperature[i] > 0:
            row = top_p_logits(top_k_logits(row / temperature[i], int(top_k[i])), float(top_p[i]))
        torch.testing.assert_close(got[i:i + 1], row)


def test_sampled_requests_are_reproducible_and_valid(loaded):
    params = SamplingParams(max_tokens=GEN, block_length=BLOCK, temperature=0.8, top_k=20, top_p=0.9, seed=3,
                            threshold=0.6)
    first = run(loaded, {"a": (prompt(6), params)})["a"][0]
    assert first == run(loaded, {"a": (prompt(6), params)})["a"][0]
    assert loaded.mask_token_id not in first and all(0 <= t < 320 for t in first)


def test_llada2_fields_are_refused_for_other_families(tmp_path):
    core = EngineCore(load_model(write_tiny_llada(tmp_path)), kv_cache="none")
    with pytest.raises(ValueError, match="editing_threshold applies to LLaDA2 models only"):
        core.add_request("a", prompt(4), SamplingParams(max_tokens=4, editing_threshold=0.5))


def test_canvas_rounded_to_blocks_must_fit(loaded):
    core = EngineCore(loaded, kv_cache="none", max_model_len=60)
    with pytest.raises(ValueError, match="in whole blocks of 32 = 64 exceeds max_model_len 60"):
        core.add_request("a", prompt(20), SamplingParams(max_tokens=30))  # 50 tokens, 64 as blocks
