"""sample_tokens against its plain-torch reference: every dtype and
confidence mode, odd sizes, strided and misaligned rows, NaN and dead rows,
and the argument checks of the wrapper and the binding."""

from __future__ import annotations

import math

import pytest
import torch

from dfastllm import _C
from dfastllm.ops import BUILT_WITH_CUDA, CONFIDENCE_MODES, sample_tokens, sample_tokens_reference

from .conftest import DEVICES, DTYPES, make_logits
from ._parity import assert_matches_reference, decided_rows

N, V = 37, 3001
# Row stride 3008: rows start 16-byte aligned (the CUDA kernel's vector path)
# while V stays odd (its remainder path).
ALIGNED_PAD = 7
MIXED_T = [0.0, 1.0, 0.5, 1.7, 0.05]


def mixed_temperatures(n: int, device: str) -> torch.Tensor:
    return torch.tensor([MIXED_T[i % len(MIXED_T)] for i in range(n)], dtype=torch.float32, device=device)


def random_seeds(n: int, device: str, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2**62, (n,), generator=gen, dtype=torch.int64).to(device)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", CONFIDENCE_MODES)
@pytest.mark.parametrize("tempered", [False, True], ids=["llada", "tempered"])
def test_matches_reference_every_dtype_and_mode(device, dtype, mode, tempered, gen):
    logits = make_logits(N, V, dtype, device, gen, pad=ALIGNED_PAD)
    offset = int(torch.randint(0, 2**40, (1,), generator=gen))
    assert_matches_reference(logits, mixed_temperatures(N, device), seed=random_seeds(N, device, gen), offset=offset,
                             confidence=mode, tempered=tempered)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_scalar_temperature_and_seed(device, temperature, gen):
    logits = make_logits(N, V, torch.bfloat16, device, gen)
    assert_matches_reference(logits, temperature, seed=int(torch.randint(0, 2**62, (1,), generator=gen)), offset=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "pad,lead",
    [(13, 0), (3, 1), (0, 5), (15, 8)],
    ids=["stride+13", "stride+4-offset1", "offset5", "aligned-stride+23-offset8"],
)
def test_strided_and_misaligned_rows(device, dtype, pad, lead, gen):
    logits = make_logits(N, V, dtype, device, gen, pad=pad, lead=lead)
    assert logits.stride(0) == V + pad + lead
    assert_matches_reference(logits, mixed_temperatures(N, device), seed=random_seeds(N, device, gen), offset=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
def test_large_vocabulary_rows(device, gen):
    # Many CPU chunks and CUDA segments per row, a vocabulary that is not a
    # multiple of any vector width.
    logits = make_logits(4, 152064 + 37, torch.bfloat16, device, gen, pad=3)  # stride 152104: aligned
    for mode in ("low_confidence", "entropy"):
        assert_matches_reference(logits, mixed_temperatures(4, device), seed=random_seeds(4, device, gen), confidence=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [4099, 4104])
def test_greedy_ties_take_first_index(device, dtype, v):
    logits = torch.zeros(3, v, dtype=dtype, device=device)
    logits[1, [7, 2500, v - 1]] = 2.0
    logits[2, v - 1] = 1.0
    tokens, conf = sample_tokens(logits, 0.0, seed=0)
    assert tokens.tolist() == [0, 7, v - 1]
    assert conf[0].item() == pytest.approx(1 / v, rel=1e-5)
    _, margin = sample_tokens(logits, 0.0, seed=0, confidence="margin")
    assert margin[:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_logits_count_as_negative_infinity(device, dtype, gen):
    logits = make_logits(N, V, dtype, device, gen, pad=ALIGNED_PAD)
    top = logits.float().argmax(dim=-1)
    logits[torch.arange(N), top] = float("nan")  # hide each row's maximum
    logits[:, :50] = float("nan")
    for mode in CONFIDENCE_MODES:
        tokens, conf = assert_matches_reference(
            logits, mixed_temperatures(N, device), seed=random_seeds(N, device, gen), confidence=mode
        )
        assert not torch.isin(tokens, torch.arange(50)).any()
        assert not (tokens == top.cpu()).any()
        assert torch.isfinite(conf).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", [0.0, 1.0, 1.5])
def test_rows_without_a_finite_logit(device, t):
    logits = torch.full((2, 1000), float("-inf"), dtype=torch.bfloat16, device=device)
    logits[1] = float("nan")
    for mode in CONFIDENCE_MODES:
        tokens, conf = sample_tokens(logits, t, seed=1, confidence=mode)
        ref_tokens, ref_conf = sample_tokens_reference(logits.cpu(), t, seed=1, confidence=mode)
        assert tokens.tolist() == [0, 0] == ref_tokens.tolist()
        if mode == "random":
            assert torch.equal(conf.cpu(), ref_conf) and ((conf >= 0) & (conf < 1)).all()
        else:
            assert conf.isnan().all() and ref_conf.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_single_column(device):
    logits = torch.randn(5, 1, device=device) * 10
    expected = {"low_confidence": 1.0, "margin": 1.0, "entropy": 0.0}
    for mode, value in expected.items():
        tokens, conf = sample_tokens(logits, 0.8, seed=3, confidence=mode)
        assert tokens.tolist() == [0] * 5
        assert conf.cpu().tolist() == pytest.approx([value] * 5, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    tokens, conf = sample_tokens(torch.empty(0, 17, device=device), 1.0, seed=1)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64
    assert conf.shape == (0,) and conf.dtype == torch.float32


def test_broadcast_row_stride_zero(gen):
    row = torch.randn(1, 500, generator=gen)
    tokens, conf = sample_tokens(row.expand(8, 500), 1.0, seed=2)
    ref_tokens, ref_conf = sample_tokens_reference(row.expand(8, 500).contiguous(), 1.0, seed=2)
    assert torch.equal(tokens, ref_tokens)


INVALID_CALLS = [
    (lambda: sample_tokens(torch.randn(10), 1.0, seed=0), ValueError, "2-D"),
    (lambda: sample_tokens(torch.randn(2, 0), 1.0, seed=0), ValueError, "V > 0"),
    (lambda: sample_tokens(torch.ones(2, 5, dtype=torch.int32), 1.0, seed=0), TypeError, "bfloat16"),
    (lambda: sample_tokens(torch.randn(5, 2).t(), 1.0, seed=0), ValueError, "contiguous"),
    (lambda: sample_tokens(torch.randn(2, 5), -0.5, seed=0), ValueError, "temperature"),
    (lambda: sample_tokens(torch.randn(2, 5), math.nan, seed=0), ValueError, "temperature"),
    (lambda: sample_tokens(torch.randn(2, 5), torch.ones(2, dtype=torch.float64), seed=0), ValueError, "temperature"),
    (lambda: sample_tokens(torch.randn(2, 5), torch.ones(3), seed=0), ValueError, "temperature must have shape [2]"),
    (lambda: sample_tokens(torch.randn(2, 5), 1.0, seed=2**64), ValueError, "seed"),
    (lambda: sample_tokens(torch.randn(2, 5), 1.0, seed=1.5), ValueError, "seed"),
    (lambda: sample_tokens(torch.randn(2, 5), 1.0, seed=torch.ones(2, dtype=torch.int32)), ValueError, "seed"),
    (lambda: sample_tokens(torch.randn(2, 5), 1.0, seed=0, offset=torch.ones(1, dtype=torch.int64)), ValueError, "offset"),
    (lambda: sample_tokens(torch.randn(2, 5), 1.0, seed=0, confidence="top_p"), ValueError, "confidence"),
]


@pytest.mark.parametrize("call,exc,fragment", INVALID_CALLS)
def test_invalid_arguments_are_named(call, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        call()


def _raw_call(**overrides):
    out_t, out_c = torch.empty(2, dtype=torch.int64), torch.empty(2)
    logits = torch.randn(2, 8)
    args = dict(device="cpu", device_index=0, logits=logits.data_ptr(), dtype=0, n_rows=2, vocab=8, row_stride=8,
                temperature=0, temperature_scalar=1.0, seed=0, seed_scalar=1, offset=0, offset_scalar=0,
                confidence_mode=0, tempered_confidence=False, selection_temperature=0,
                selection_temperature_scalar=0.0, tokens=out_t.data_ptr(), confidence=out_c.data_ptr(), num_threads=1, stream=0)
    args.update(overrides)
    _C.sample_tokens(**args)


@pytest.mark.parametrize("override,fragment", [
    ({"vocab": 0}, "vocab must be > 0"),
    ({"dtype": 7}, "dtype must be"),
    ({"confidence_mode": 9}, "confidence_mode must be"),
    ({"num_threads": 0}, "num_threads must be >= 1"),
    ({"logits": 0}, "logits must be a non-null"),
    ({"tokens": 4}, "tokens must be aligned"),
    ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
    ({"n_rows": -1}, "n_rows must be >= 0"),
])
def test_binding_checks_every_argument(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        _raw_call(**override)


@pytest.mark.skipif(BUILT_WITH_CUDA, reason="the extension has CUDA kernels")
def test_cuda_call_on_cpu_only_build_is_a_clear_error():
    with pytest.raises(ValueError, match="built without CUDA"):
        _raw_call(device="cuda")


# ---- Dream: tempered confidences and the alg_temp selection ------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["low_confidence", "margin", "entropy"])
def test_tempered_is_logits_over_t_at_temperature_one(device, mode, gen):
    """A tempered row at t reads as the row x / t at temperature 1: the same
    tokens (the rows where rounding decides aside) and confidences."""
    logits = make_logits(N, V, torch.float32, device, gen, pad=13)
    temps = torch.tensor([0.7, 1.3, 0.25, 1.0] * 10)[:N].to(device)
    seeds = random_seeds(N, device, gen)
    tokens, conf = sample_tokens(logits, temps, seed=seeds, confidence=mode, tempered=True)
    scaled = (logits.double() / temps.double()[:, None]).float()
    plain_tokens, plain_conf = sample_tokens(scaled, torch.ones(N, device=device), seed=seeds, confidence=mode)
    decided = decided_rows(scaled, 1.0, seeds, 0).to(device)
    assert torch.equal(tokens[decided], plain_tokens[decided])
    same = tokens == plain_tokens
    torch.testing.assert_close(conf[same], plain_conf[same], rtol=2e-5, atol=1e-6)
    # Untempered, the confidence stays at temperature 1 (LLaDA): another value.
    untempered = sample_tokens(logits, temps, seed=seeds, confidence=mode)
    assert not torch.equal(untempered[1], conf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", CONFIDENCE_MODES)
def test_selection_temperature_matches_reference(device, dtype, mode, gen):
    logits = make_logits(N, V, dtype, device, gen, pad=ALIGNED_PAD)
    selection = torch.tensor([[0.0, 0.5, 0.1, 2.0][i % 4] for i in range(N)], dtype=torch.float32, device=device)
    tokens, keys = assert_matches_reference(logits, mixed_temperatures(N, device), seed=random_seeds(N, device, gen),
                                            confidence=mode, tempered=True, selection_temperature=selection)
    assert keys.isfinite().all()


def test_selection_temperature_scalar_and_checks():
    logits = torch.randn(6, 40)
    by_scalar = sample_tokens(logits, 0.0, seed=4, selection_temperature=0.3)
    by_tensor = sample_tokens(logits, 0.0, seed=4, selection_temperature=torch.full((6,), 0.3))
    assert torch.equal(by_scalar[1], by_tensor[1])
    # Without it the confidences are the plain ones; the tokens never change.
    plain = sample_tokens(logits, 0.0, seed=4)
    assert torch.equal(plain[0], by_scalar[0]) and not torch.equal(plain[1], by_scalar[1])
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="selection_temperature"):
            sample_tokens(logits, 0.0, seed=4, selection_temperature=bad)
    with pytest.raises(ValueError, match="selection_temperature must have shape"):
        sample_tokens(logits, 0.0, seed=4, selection_temperature=torch.ones(5))
    with pytest.raises(ValueError, match="selection_temperature_scalar must be >= 0"):
        _raw_call(selection_temperature_scalar=-1.0)
