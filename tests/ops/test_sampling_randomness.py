"""The random side of sample_tokens: Philox known answers, draws that depend
only on (seed, offset) whatever the batch, call, row order or thread count,
and samples that follow softmax(logits / t) (chi-square)."""

from __future__ import annotations

import pytest
import torch

from dfastllm import _C
from dfastllm.ops import sample_tokens, sample_tokens_reference
from dfastllm.ops.reference import philox4x32_10, row_uniforms

from .conftest import DEVICES, make_logits

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# chi-square critical values at p = 1e-6 (a false alarm once in a million runs).
CHI2_CRITICAL_1E6 = {15: 56.49, 9: 37.0}  # df 9: scipy.stats.chi2.ppf(1 - 1e-6, 9) = 36.99


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(_C.philox4x32_10(list(counter), list(key))) == expected
    as_tensors = lambda words: [torch.tensor([w], dtype=torch.int64) for w in words]  # noqa: E731
    assert tuple(int(w) for w in philox4x32_10(as_tensors(counter), as_tensors(key))) == expected


def test_row_uniforms_match_reference_bit_for_bit(gen):
    seeds = torch.cat([torch.randint(-(2**63), 2**63 - 1, (200,), generator=gen), torch.tensor([0, -1, 2**63 - 1])])
    offsets = torch.cat([torch.randint(-(2**63), 2**63 - 1, (200,), generator=gen), torch.tensor([0, -1, 2**63 - 1])])
    ref_sample, ref_conf = row_uniforms(seeds, offsets)
    for i in range(len(seeds)):
        sample, conf = _C.row_uniforms(int(seeds[i]), int(offsets[i]))
        assert sample == ref_sample[i].item() and conf == ref_conf[i].item()
        assert 0.0 <= sample < 1.0 and 0.0 <= conf < 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", [1.0, 0.8])
def test_draws_depend_only_on_seed_and_offset(device, t, gen):
    n = 64
    logits = make_logits(n, 3001, torch.bfloat16, device, gen, scale=1.0, pad=7)  # aligned rows
    seeds = torch.randint(0, 2**62, (n,), generator=gen).to(device)
    offsets = torch.randint(0, 2**40, (n,), generator=gen).to(device)
    temps = torch.full((n,), t, device=device)
    tokens, conf = sample_tokens(logits, temps, seed=seeds, offset=offsets)
    # Same call again.
    again = sample_tokens(logits, temps, seed=seeds, offset=offsets)
    assert torch.equal(again[0], tokens) and torch.equal(again[1], conf)
    # Rows in another order.
    perm = torch.randperm(n, generator=gen).to(device)
    shuffled = sample_tokens(logits[perm], temps[perm], seed=seeds[perm], offset=offsets[perm])
    assert torch.equal(shuffled[0], tokens[perm]) and torch.equal(shuffled[1], conf[perm])
    # Split into batches of uneven sizes.
    parts = [sample_tokens(logits[a:b], temps[a:b], seed=seeds[a:b], offset=offsets[a:b]) for a, b in [(0, 1), (1, 30), (30, n)]]
    assert torch.equal(torch.cat([p[0] for p in parts]), tokens)
    assert torch.equal(torch.cat([p[1] for p in parts]), conf)
    # One thread instead of two.
    torch.set_num_threads(1)
    single = sample_tokens(logits, temps, seed=seeds, offset=offsets)
    assert torch.equal(single[0], tokens) and torch.equal(single[1], conf)
    # Another seed draws other tokens (at this flat a distribution nearly all differ).
    other = sample_tokens(logits, temps, seed=seeds + 1, offset=offsets)
    assert (other[0] != tokens).float().mean() > 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_scalar_offset_means_offset_plus_row(device, gen):
    logits = make_logits(20, 999, torch.float32, device, gen, scale=1.0)
    by_scalar = sample_tokens(logits, 1.0, seed=7, offset=100, confidence="random")
    by_tensor = sample_tokens(logits, 1.0, seed=torch.full((20,), 7, device=device),
                              offset=torch.arange(100, 120, device=device), confidence="random")
    assert torch.equal(by_scalar[0], by_tensor[0]) and torch.equal(by_scalar[1], by_tensor[1])


def _chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", [1.0, 0.6, 1.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_samples_follow_softmax(device, t, dtype, gen):
    n, v = 40000, 18
    row = (torch.randn(v, generator=gen) * 1.5).to(dtype)
    row[3] = float("-inf")
    row[11] = float("nan")
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    logits = row.to(device).expand(n, v)
    tokens, conf = sample_tokens(logits, t, seed=seed)
    counts = torch.bincount(tokens.cpu(), minlength=v).double()
    x = torch.where(row.double().isnan(), float("-inf"), row.double())
    p = torch.softmax(x / t, dim=-1)
    assert counts[3] == 0 and counts[11] == 0, "a -inf or NaN column was drawn"
    live = p > 0
    stat = _chi_square(counts[live], n * p[live])
    assert stat < CHI2_CRITICAL_1E6[15], f"chi-square {stat:.1f} over {int(live.sum()) - 1} dof"
    # low_confidence is the temperature-1 probability of the drawn token.
    p1 = torch.softmax(x, dim=-1).float()
    torch.testing.assert_close(conf.cpu(), p1[tokens.cpu()], rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_random_confidence_is_uniform_and_matches_reference(device, gen):
    n = 20000
    logits = make_logits(1, 50, torch.float32, device, gen).expand(n, 50)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    _, conf = sample_tokens(logits, 0.0, seed=seed, confidence="random")
    _, ref = sample_tokens_reference(logits[:1].cpu().expand(n, 50), 0.0, seed=seed, confidence="random")
    assert torch.equal(conf.cpu(), ref)
    counts = torch.histc(conf.cpu().double(), bins=10, min=0.0, max=1.0)
    assert _chi_square(counts, torch.full((10,), n / 10, dtype=torch.float64)) < CHI2_CRITICAL_1E6[9]
