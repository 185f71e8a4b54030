"""add_rms_norm against its reference: every dtype, odd sizes, strided rows,
with and without the residual, and argument checks."""

from __future__ import annotations

import pytest
import torch

from dfastllm.ops import add_rms_norm, add_rms_norm_reference

from .conftest import DEVICES, DTYPES

# The kernel sums the squares in another order than torch, which may move the
# rounding of the normed row by one unit in the dtype's last place, and the
# product with the weight to two (relative units: the largest gap between
# neighbours of each dtype).
ULPS = {torch.float32: 4e-6, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


def _rows(shape, dtype, device, gen, *, pad=0):
    """Random [..., D] rows; pad > 0 makes them a strided slice of wider rows."""
    full = torch.randn(*shape[:-1], shape[-1] + pad, generator=gen) * 3
    return full.to(dtype).to(device)[..., :shape[-1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_reference(device, dtype, with_residual, gen):
    x = _rows((37, 301), dtype, device, gen, pad=5)
    residual = _rows((37, 301), dtype, device, gen) if with_residual else None
    weight = (torch.rand(301, generator=gen) + 0.5).to(dtype).to(device)
    out, new_residual = add_rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = add_rms_norm_reference(x.cpu(), weight.cpu(), 1e-5,
                                                   residual.cpu() if with_residual else None)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    # The sum is one rounded add, as in torch: bit for bit.
    torch.testing.assert_close(new_residual.cpu(), ref_residual, atol=0, rtol=0)
    torch.testing.assert_close(out.cpu(), ref_out, atol=ULPS[dtype], rtol=ULPS[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_three_dims_and_a_single_row(device, gen):
    x = _rows((2, 5, 64), torch.float32, device, gen)[:, 1:4]  # rows of two strides
    residual = _rows((2, 3, 64), torch.float32, device, gen)
    weight = torch.randn(64, generator=gen).to(device)
    out, new_residual = add_rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = add_rms_norm_reference(x.cpu(), weight.cpu(), 1e-6, residual.cpu())
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_residual.cpu(), ref_residual)
    one, _ = add_rms_norm(x[0, 0], weight, 1e-6)  # [D]
    torch.testing.assert_close(one.cpu(), add_rms_norm_reference(x[0, 0].cpu(), weight.cpu(), 1e-6)[0],
                               atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        add_rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="weight must be a torch.float32"):
        add_rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="residual must have shape"):
        add_rms_norm(x, torch.ones(8), 1e-5, torch.randn(4, 9))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        add_rms_norm(x.t(), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        add_rms_norm(x, torch.ones(8), -1.0)
