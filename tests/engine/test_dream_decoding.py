"""Dream's own decoding (a Dream model, block_length omitted) against Dream's
published generation (`generation_utils.py`, `DreamGenerationMixin._sample`).

The reference below is our own plain-torch loop written from that code: the
whole canvas every step, logits shifted by one, `sample_tokens` (logits / T,
top-p, top-k, then the token and its confidence from that distribution;
`topk_margin` top-1 minus top-2, `entropy` sum p log(p + 1e-10)), the
linspace(1, eps, steps + 1) schedule with int(m * (1 - s/t)) per step and
the rest at the last, and the top n of the confidences over the canvas. It
runs each prompt alone (Dream's left-padded batches are built to be the
same). It shares nothing with the engine but the model's forward and head.

One rule is added, as the engine has it: the mask token is never proposed
(the public code can commit it on a random checkpoint and then stall).
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.engine.request import Request
from dfastllm.llm import LLM

from .conftest import prompt
from .test_reference_parity import truncate_at_stop


def dream_top_p(logits, top_p):
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def dream_top_k(logits, top_k):
    top_k = min(top_k, logits.size(-1))
    return logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1, None], torch.finfo(logits.dtype).min)


def dream_probs(logits, temperature, top_p=None, top_k=None):
    """The distribution Dream's `sample_tokens` draws from."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = dream_top_p(logits, top_p)
    if top_k is not None:
        logits = dream_top_k(logits, top_k)
    return torch.softmax(logits, dim=-1)


def dream_sample_tokens(logits, alg, top_p=None, top_k=None):
    """Dream's `sample_tokens` at temperature 0."""
    probs = dream_probs(logits, 0.0, top_p, top_k)
    confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.inference_mode()
def dream_generate(loaded, prompt_ids, gen_length, steps, alg, *, eps=1e-3, top_p=None, top_k=None):
    model, mask_id = loaded.model, loaded.mask_token_id
    x = torch.tensor([prompt_ids + [mask_id] * gen_length])
    positions = torch.arange(x.shape[1])[None]
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model.head(model(x, positions))
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., mask_id] = -torch.inf
        confidence, x0 = dream_sample_tokens(logits[mask_index], alg, top_p, top_k)
        t, s = timesteps[i], timesteps[i + 1]
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        n = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if n > 0:
            _, transfer = torch.topk(full_confidence, n)
            proposal = torch.full_like(x, mask_id)
            proposal[mask_index] = x0
            x[0, transfer[0]] = proposal[0, transfer[0]]
    assert not (x == mask_id).any()
    return x[0, len(prompt_ids):].tolist()


PROMPTS = [prompt(5), prompt(9, start=90), prompt(3, start=150)]
# (gen_length, steps): one token per step, a few per step, steps whose counts
# truncate to 0 (skipped), and a last step that takes the most.
CASES = [(16, 16), (16, 5), (20, 3), (4, 4)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_engine_matches_dreams_generation(alg, dream):
    llm = LLM(dream, kv_cache="none")
    stop_ids = {dream.eos_token_id, dream.eot_token_id} - {None}
    for gen_length, steps in CASES:
        params = SamplingParams(max_tokens=gen_length, steps=steps, alg=alg)
        together = llm.generate(PROMPTS, params)
        for i, ids in enumerate(PROMPTS):
            expected, reason = truncate_at_stop(dream_generate(dream, ids, gen_length, steps, alg), stop_ids)
            alone = llm.generate([ids], params)[0]
            for out in (together[i], alone):
                assert (out.token_ids, out.finish_reason) == (expected, reason), (alg, gen_length, steps, ids)


@pytest.mark.timeout(120)
def test_filters_and_eps_follow_dream(dream):
    """top-p and top-k change the confidences even at T = 0; eps moves the schedule."""
    llm = LLM(dream, kv_cache="none")
    stop_ids = {dream.eos_token_id, dream.eot_token_id} - {None}
    for alg, top_p, top_k, eps in [("maskgit_plus", 0.5, None, 0.2), ("entropy", 0.9, 7, 1e-3),
                                   ("topk_margin", None, 3, 0.05)]:
        params = SamplingParams(max_tokens=12, steps=6, alg=alg, top_p=top_p or 1.0, top_k=top_k, eps=eps)
        outputs = llm.generate(PROMPTS, params)
        for ids, out in zip(PROMPTS, outputs):
            ref = dream_generate(dream, ids, 12, 6, alg, eps=eps, top_p=top_p, top_k=top_k)
            assert (out.token_ids, out.finish_reason) == truncate_at_stop(ref, stop_ids), (alg, ids)


def commits_per_step(core: EngineCore) -> list[int]:
    per_step = []
    while core.has_unfinished():
        core.step()
        per_step.append(core.stats.last_step_tokens_committed)
    return per_step


def test_schedule_counts_and_skipped_steps(dream):
    """Dream's counts per step; the steps that commit nothing run no forward."""
    core = EngineCore(dream)
    core.add_request("x", prompt(4), SamplingParams(max_tokens=20, steps=3, alg="entropy", ignore_eos=True))
    # linspace(1, 1e-3, 4) = 1, .667, .334, .001: int(20 * .333) = 6, int(14 * .4995) = 6, then 8.
    assert commits_per_step(core) == [6, 6, 8]
    core.add_request("y", prompt(4), SamplingParams(max_tokens=4, steps=4, alg="entropy", ignore_eos=True))
    # int(4 * .2498) = 0 (skipped: no forward), int(4 * .333) = 1, int(3 * .499) = 1, then 2.
    assert commits_per_step(core) == [1, 1, 2]


def test_block_length_keeps_llada_block_decoding(dream):
    from .test_reference_parity import reference_generate

    llm = LLM(dream, kv_cache="none")
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=16, block_length=8, steps=8, ignore_eos=True))[0]
    assert out.token_ids == reference_generate(dream, PROMPTS[0], 16, 8, 8)


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_cached_modes_finish_with_the_same_schedule(dream, kv_cache):
    """The cached modes reuse the prompt's K/V from the first step (the
    whole answer is one block); the schedule and the lengths are the same."""
    params = SamplingParams(max_tokens=16, steps=5, alg="maskgit_plus", ignore_eos=True)
    llm = LLM(dream, kv_cache=kv_cache)
    out = llm.generate([PROMPTS[1]], params)[0]
    assert len(out.token_ids) == 16 and dream.mask_token_id not in out.token_ids
    assert out.num_steps == 5


@pytest.mark.parametrize("fields,name", [(dict(block_length=4, alg="entropy"), "alg"),
                                         (dict(block_length=4, eps=0.1), "eps"),
                                         (dict(remasking="random"), "remasking")])
def test_fields_that_do_not_apply_are_refused(dream, fields, name):
    core = EngineCore(dream)
    with pytest.raises(ValueError, match=name):
        core.add_request("x", prompt(3), SamplingParams(max_tokens=8, **fields))


def test_dream_fields_on_llada_are_refused(llada):
    with pytest.raises(ValueError, match="alg_temp applies to Dream"):
        EngineCore(llada).add_request("x", prompt(3), SamplingParams(max_tokens=8, alg_temp=0.5))


# ---- T > 0: the published distributions (chi-square) -----------------------

# chi-square critical values at p = 1e-6 (a false alarm once in a million runs)
CHI2_CRITICAL_1E6 = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52, 8: 42.70, 9: 44.81,
                     10: 46.86, 11: 48.87, 12: 50.83, 13: 52.76, 14: 54.65}


def chi_square(observed: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the bins expecting at least 5 (the rest pooled); -> (statistic, df)."""
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def sampling_inputs(n, *, temperature, top_p=1.0, top_k=0, selection=0.0, confidence, seed=7):
    from dfastllm.engine.sampler import SamplingInputs

    filtered = top_p < 1.0 or top_k > 0
    return SamplingInputs(
        temperature=torch.full((n,), temperature), seed=torch.full((n,), seed, dtype=torch.long),
        rng_offset=torch.arange(n, dtype=torch.long),
        selection_temperature=torch.full((n,), selection) if selection else None,
        filter_rows=torch.arange(n) if filtered else None,
        top_p=torch.full((n,), top_p) if filtered else None,
        top_k=torch.full((n,), top_k, dtype=torch.long) if filtered else None,
        groups={(confidence, True): None}, commit_k=torch.zeros(0, dtype=torch.int32),
        threshold=torch.zeros(0))


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 8), (1.3, 1.0, 0), (0.4, 0.97, 0)])
def test_tokens_follow_dreams_distribution(temperature, top_p, top_k):
    from dfastllm.engine.sampler import propose
    from dfastllm.sampling_params import Remasking

    gen = torch.Generator().manual_seed(3)
    row = torch.randn(1, 13, generator=gen) * 1.5
    draws = 40_000
    inputs = sampling_inputs(draws, temperature=temperature, top_p=top_p, top_k=top_k,
                             confidence=Remasking.LOW_CONFIDENCE)
    tokens, confidence = propose(row.expand(draws, -1).clone(), inputs)
    probs = dream_probs(row.double(), temperature, top_p, top_k or None)[0]
    observed = np.bincount(tokens.numpy(), minlength=13)
    stat, df = chi_square(observed, draws * probs.numpy())
    assert stat < CHI2_CRITICAL_1E6[df], (stat, df, observed)
    # maskgit_plus: the confidence is the drawn token's probability under that distribution.
    torch.testing.assert_close(confidence.double(), probs[tokens], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alg_temp,n", [(0.5, 1), (0.02, 2), (0.05, 3)])
def test_alg_temp_draws_without_replacement_from_softmax(alg_temp, n):
    """The n committed cells follow torch.multinomial(softmax(confidence /
    alg_temp), n) without replacement (Plackett-Luce), as Dream draws them."""
    from itertools import combinations, permutations

    from dfastllm import ops
    from dfastllm.engine.sampler import propose
    from dfastllm.sampling_params import Remasking

    k_cands, trials, vocab, mask_id = 5, 12_000, 11, 10
    gen = torch.Generator().manual_seed(5)
    cand_logits = torch.randn(k_cands, vocab, generator=gen) * 1.2
    cand_logits[:, mask_id] = -torch.inf
    logits = cand_logits.repeat(trials, 1)  # trial j: rows j*K .. j*K + K - 1
    inputs = sampling_inputs(trials * k_cands, temperature=0.0, selection=alg_temp,
                             confidence=Remasking.LOW_CONFIDENCE)
    tokens, keys = propose(logits, inputs)
    canvas = torch.full((trials, k_cands), mask_id, dtype=torch.long)
    offsets = torch.arange(trials + 1, dtype=torch.int32) * k_cands
    positions = torch.arange(k_cands).repeat(trials)
    ops.commit_tokens(canvas, offsets, positions, tokens, keys, torch.full((trials,), n, dtype=torch.int32),
                      torch.zeros(trials), mask_id)
    chosen = canvas != mask_id  # [trials, K]
    assert (chosen.sum(1) == n).all()

    confidence = dream_probs(cand_logits.double(), 0.0).max(-1).values  # maskgit_plus at T = 0
    weights = torch.softmax(confidence / alg_temp, dim=0).numpy()
    subsets = list(combinations(range(k_cands), n))
    expected = np.zeros(len(subsets))
    for j, subset in enumerate(subsets):
        for order in permutations(subset):
            p, left = 1.0, 1.0
            for i in order:
                p *= weights[i] / left
                left -= weights[i]
            expected[j] += p
    index = {s: j for j, s in enumerate(subsets)}
    observed = np.zeros(len(subsets))
    for row in chosen.numpy():
        observed[index[tuple(np.flatnonzero(row))]] += 1
    stat, df = chi_square(observed, trials * expected)
    assert stat < CHI2_CRITICAL_1E6[df], (stat, df, observed, trials * expected)


def test_origin_commits_each_cell_with_probability_one_minus_s_over_t(dream):
    """origin's count at a step is Binomial(m, 1 - s/t) (each cell kept with
    that probability, as Dream's `torch.rand(...) < p_transfer`)."""
    from math import comb

    m, steps, draws = 12, 5, 4000
    params = SamplingParams(max_tokens=m, steps=steps, alg="origin")
    counts = np.zeros((steps, m + 1))  # [step of the first commit, count]
    for seed in range(draws):
        r = Request("x", [1, 2], params, seed=seed, mask_id=dream.mask_token_id, stop_ids=frozenset(),
                    deadline=None, arrival=0.0, family="dream")
        counts[r.block_step, r.commit_count()] += 1
    # A step whose count is 0 moves on to the next: P(first commit at step j,
    # count k) = prod_{i<j} (1 - p_i)^m * Binomial(m, p_j)(k), p_j = 1 - s/t.
    t = torch.linspace(1, 1e-3, steps + 1)
    p = [float(1 - t[j + 1] / t[j]) for j in range(steps - 1)] + [1.0]
    expected = np.zeros((steps, m + 1))
    none_yet = 1.0
    for j in range(steps):
        expected[j, 1:] = [none_yet * comb(m, k) * p[j] ** k * (1 - p[j]) ** (m - k) for k in range(1, m + 1)]
        none_yet *= (1 - p[j]) ** m
    stat, df = chi_square(counts.ravel(), draws * expected.ravel())
    assert stat < CHI2_CRITICAL_1E6[df], (stat, df, counts)
