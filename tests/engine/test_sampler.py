"""The decoding algorithms: the per-block commit schedule, threshold
(parallel) decoding, nucleus filtering and batches that mix remasking rules."""

import pytest
import torch

from dfastllm import Remasking, SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.engine.sampler import filter_logits, num_transfer_tokens, split_steps

from .conftest import generate, prompt


def test_num_transfer_tokens_front_loads_the_remainder():
    assert num_transfer_tokens(8, 4) == [2, 2, 2, 2]
    assert num_transfer_tokens(10, 4) == [3, 3, 2, 2]
    assert num_transfer_tokens(5, 5) == [1] * 5
    assert num_transfer_tokens(32, 1) == [32]


def test_split_steps_over_blocks():
    assert split_steps(8, [4, 4]) == [4, 4]  # LLaDA: steps divisible by blocks
    assert split_steps(7, [8, 8, 8]) == [3, 2, 2]  # as even as possible, first blocks first
    assert split_steps(2, [8, 8, 8]) == [1, 1, 1]  # at least one per block
    assert split_steps(20, [8, 8, 4]) == [7, 7, 4]  # never more steps than a block has tokens


def test_request_schedule_follows_the_blocks(llada):
    params = SamplingParams(max_tokens=20, block_length=8, steps=10, ignore_eos=True)
    core = EngineCore(llada)
    core.add_request("x", prompt(3), params)
    per_step = []
    while core.has_unfinished():
        core.step()
        per_step.append(core.stats.last_step_tokens_committed)
    # Blocks of 8, 8, 4 with 4, 3, 3 steps.
    assert per_step == [2, 2, 2, 2, 3, 3, 2, 2, 1, 1]


@pytest.mark.timeout(60)
def test_threshold_decoding_on_a_confident_checkpoint(confident_llada):
    params = SamplingParams(max_tokens=32, block_length=8, threshold=0.9, ignore_eos=True)
    core = EngineCore(confident_llada, kv_cache="dual")
    core.add_request("x", prompt(6), params)
    tokens, per_step = [], []
    while core.has_unfinished():
        for out in core.step():
            tokens += out.new_token_ids
            last = out
        per_step.append(core.stats.last_step_tokens_committed)
    assert len(tokens) == 32 and confident_llada.mask_token_id not in tokens
    assert min(per_step) >= 1
    assert last.num_steps == len(per_step) < 32  # parallel commits: fewer steps than tokens
    assert max(per_step) > 1


@pytest.mark.timeout(60)
def test_threshold_commits_at_least_one_per_step(llada):
    # A random checkpoint never reaches 1.0: exactly the best token each step.
    params = SamplingParams(max_tokens=12, block_length=4, threshold=1.0, ignore_eos=True)
    tokens, out = generate(llada, [("x", prompt(4), params)])["x"]
    assert len(tokens) == 12 and out.num_steps == 12


def _kept(logits, temperature, top_p, top_k):
    return filter_logits(logits, torch.tensor(temperature), torch.tensor(top_p),
                         torch.tensor(top_k, dtype=torch.long)).isfinite()


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = _kept(logits, [0.0, 0.0], [0.7, 0.85], [0, 0])
    assert kept.tolist() == [[True, True, False, False], [False, True, True, True]]
    # top_p = 1 keeps everything; the argmax always survives.
    assert _kept(logits, [0.0, 0.0], [1.0, 0.01], [0, 0]).sum(-1).tolist() == [4, 1]


def test_top_p_applies_to_the_tempered_distribution():
    # Dream divides by the temperature first: at t = 0.25 the head [0.5, 0.3]
    # becomes [0.87, 0.11], so p = 0.7 keeps only the first token.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert _kept(logits, [0.0], [0.7], [0]).sum().item() == 2
    assert _kept(logits, [0.25], [0.7], [0]).sum().item() == 1
    assert _kept(logits, [4.0], [0.7], [0]).sum().item() == 3


def test_top_k_keeps_ties_and_meets_top_p():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    # Ties with the k-th are kept (Dream's `logits < kth` rule).
    assert _kept(logits, [1.0, 1.0], [1.0, 1.0], [2, 1]).tolist() == [
        [True, False, True, True, False], [False, False, False, False, True]]
    # Both filters: the smaller of the two sets (top_p keeps 1 of the first
    # row, top_k 2 of the second).
    assert _kept(logits, [1.0, 1.0], [0.5, 0.99], [3, 2]).sum(-1).tolist() == [1, 2]
    assert _kept(logits, [1.0, 1.0], [0.99, 0.99], [0, 0]).sum(-1).tolist() == [5, 5]


@pytest.mark.timeout(60)
def test_mixed_rules_in_one_batch_equal_alone(llada):
    """One sampling call per confidence mode; each request as if alone."""
    requests = []
    for i, rule in enumerate(Remasking):
        params = SamplingParams(max_tokens=8, block_length=4, steps=4, remasking=rule, seed=i,
                                temperature=0.5 * (i % 2), top_p=0.9 if i == 1 else 1.0, ignore_eos=True)
        requests.append((rule.name, prompt(3 + 2 * i, start=40 + i), params))
    requests.append(("threshold", prompt(5), SamplingParams(max_tokens=8, block_length=4, threshold=0.5,
                                                             ignore_eos=True)))
    together = generate(llada, requests)
    for rid, ids, params in requests:
        assert together[rid][0] == generate(llada, [(rid, ids, params)])[rid][0], rid
        assert len(together[rid][0]) == 8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_a_model_that_prefers_the_mask_token_still_finishes(tmp_path, threshold):
    # Committing the mask token would leave the cell masked forever (this
    # hung threshold decoding); the sampler never proposes it.
    from dfastllm.models import load_model
    from dfastllm.testing import write_tiny_llada

    loaded = load_model(write_tiny_llada(tmp_path, seed=21))
    with torch.no_grad():
        loaded.model.output.weight[loaded.mask_token_id] *= 50.0
    params = SamplingParams(max_tokens=16, block_length=16, steps=8, threshold=threshold, ignore_eos=True)
    tokens, out = generate(loaded, [("x", prompt(3), params)])["x"]
    assert len(tokens) == 16 and loaded.mask_token_id not in tokens
    assert out.finish_reason == "length"
