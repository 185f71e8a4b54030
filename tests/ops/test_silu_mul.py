"""silu_mul against its reference: every dtype, odd sizes, strided rows,
large and non-finite gates, and argument checks."""

from __future__ import annotations

import pytest
import torch

from dfastllm.ops import silu_mul, silu_mul_reference

from .conftest import DEVICES, DTYPES

# silu's exp differs from torch's by an ulp or so; a rounding of silu to the
# dtype may carry that to one unit in its last place, and the product with up
# to two (relative units: the largest gap between neighbours of each dtype).
ULPS = {torch.float32: 4e-6, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, dtype, gen):
    full = torch.randn(37, 2 * 203 + 3, generator=gen) * 4
    full[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 90.0, -90.0, 1e-3, -1e-3])
    gate_up = full.to(dtype).to(device)[:, :2 * 203]  # strided rows
    out = silu_mul(gate_up)
    assert out.shape == (37, 203) and out.dtype == dtype and out.device == gate_up.device
    torch.testing.assert_close(out.cpu(), silu_mul_reference(gate_up.cpu()), atol=ULPS[dtype] * 1e-3,
                               rtol=ULPS[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_gates(device):
    gate_up = torch.tensor([[float("nan"), float("inf"), float("-inf"), 2.0, 1.0, 1.0, 1.0, float("nan")]],
                           device=device)
    out = silu_mul(gate_up).cpu()
    ref = silu_mul_reference(gate_up.cpu())
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_three_dims(device, gen):
    gate_up = torch.randn(2, 5, 2 * 33, generator=gen).to(device)
    torch.testing.assert_close(silu_mul(gate_up).cpu(), silu_mul_reference(gate_up.cpu()), atol=1e-6, rtol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="last dim must be even"):
        silu_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="gate_up must be a float32/float16/bfloat16"):
        silu_mul(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        silu_mul(torch.randn(8, 3).t())
