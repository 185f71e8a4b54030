"""rope_write_kv against its reference: both rotation precisions, every
dtype, odd sizes, a strided q_out and a strided cache (a dense cache seen as
pages), padding slots and slots outside the pool, and argument checks."""

from __future__ import annotations

import pytest
import torch

from dfastllm.ops import rope_write_kv, rope_write_kv_reference

from .conftest import DEVICES, DTYPES

# One unit in the last place (relative: the largest gap between neighbours of
# each dtype): rotating in fp32, the kernel may contract a product and a sum
# into one FMA where torch rounds both, which can move the final rounding.
ULP = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _cos_sin(B, T, head_dim, gen, theta=10000.0):
    positions = torch.randint(0, 4000, (B, T), generator=gen).float()
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions[..., None] * inv_freq                                   # [B, T, D/2]
    return angles.cos(), angles.sin()


def _case(dtype, device, gen, *, B=2, T=7, H=6, Hkv=2, D=18, P=5, S=4):
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D + 3, generator=gen) * 2).to(dtype)[..., :(H + 2 * Hkv) * D]
    cos, sin = _cos_sin(B, T, D, gen)
    # A paged pool seen through a permuted view: [P, S, Hkv, D] with the head
    # dim outermost in memory (as a dense [B, Hkv, S, D] cache transposed).
    k_cache = torch.randn(Hkv, P, S, D, generator=gen).to(dtype).permute(1, 2, 0, 3)
    v_cache = torch.randn(Hkv, P, S, D, generator=gen).to(dtype).permute(1, 2, 0, 3)
    slots = torch.randperm(P * S, generator=gen)[:B * T].view(B, T).clone()
    slots[0, 1], slots[1, -1], slots[1, 0] = -1, P * S, -7  # padding and out-of-pool: not written
    to = lambda t: t.to(device)  # noqa: E731
    return to(qkv), to(cos), to(sin), to(k_cache), to(v_cache), to(slots), H


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotate_in_fp32", [True, False])
def test_matches_reference(device, dtype, rotate_in_fp32, gen):
    qkv, cos, sin, k_cache, v_cache, slots, H = _case(dtype, device, gen)
    ref_k, ref_v = k_cache.cpu().clone(), v_cache.cpu().clone()
    B, T, _ = qkv.shape
    q_heads_first = torch.empty(B, H, T, qkv.shape[-1] // (H + 4), dtype=dtype, device=device)
    q = rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, n_heads=H, rotate_in_fp32=rotate_in_fp32,
                      q_out=q_heads_first.transpose(1, 2))
    ref_q = rope_write_kv_reference(qkv.cpu(), cos.cpu(), sin.cpu(), ref_k, ref_v, slots.cpu(), n_heads=H,
                                    rotate_in_fp32=rotate_in_fp32)
    assert q.data_ptr() == q_heads_first.data_ptr()
    tol = ULP[dtype]
    torch.testing.assert_close(q.cpu(), ref_q, atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache.cpu(), ref_k, atol=tol, rtol=tol)  # untouched slots included
    torch.testing.assert_close(v_cache.cpu(), ref_v, atol=0, rtol=0)
    if dtype != torch.float32 and not rotate_in_fp32:
        # In the dtype every op rounds where torch rounds: bit for bit.
        torch.testing.assert_close(q.cpu(), ref_q, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_one_page_per_row_writes_the_dense_cache(device, gen):
    """A dense [B, Hkv, L, D] cache is the paged one with one page of L slots per row."""
    B, T, H, Hkv, D, L = 3, 5, 4, 4, 16, 11
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=gen).to(device)
    cos, sin = (t.to(device) for t in _cos_sin(B, T, D, gen))
    k_dense = torch.zeros(B, Hkv, L, D, device=device)
    v_dense = torch.zeros(B, Hkv, L, D, device=device)
    positions = torch.stack([torch.randperm(L, generator=gen)[:T] for _ in range(B)]).to(device)
    slots = torch.arange(B, device=device)[:, None] * L + positions
    q = rope_write_kv(qkv, cos, sin, k_dense.transpose(1, 2), v_dense.transpose(1, 2), slots, n_heads=H,
                      rotate_in_fp32=True)
    ref_k, ref_v = torch.zeros(B, L, Hkv, D), torch.zeros(B, L, Hkv, D)
    ref_q = rope_write_kv_reference(qkv.cpu(), cos.cpu(), sin.cpu(), ref_k, ref_v, slots.cpu(), n_heads=H,
                                    rotate_in_fp32=True)
    torch.testing.assert_close(q.cpu(), ref_q, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(k_dense.transpose(1, 2).cpu(), ref_k, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(v_dense.transpose(1, 2).cpu(), ref_v, atol=0, rtol=0)
    for b in range(B):  # each token landed at its own position of its own row
        torch.testing.assert_close(v_dense[b, :, positions[b]].transpose(0, 1).cpu(),
                                   qkv[b, :, (H + Hkv) * D:].view(T, Hkv, D).cpu())


def test_bad_arguments_are_named(gen):
    qkv, cos, sin, k_cache, v_cache, slots, H = _case(torch.float32, "cpu", gen)
    call = dict(n_heads=H, rotate_in_fp32=True)
    with pytest.raises(ValueError, match=r"qkv's last dim 180 must be \(n_heads 5"):
        rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, n_heads=5, rotate_in_fp32=True)
    with pytest.raises(ValueError, match="cos must have shape"):
        rope_write_kv(qkv, cos[..., :-1], sin, k_cache, v_cache, slots, **call)
    with pytest.raises(ValueError, match="sin must be a torch.float32"):
        rope_write_kv(qkv, cos, sin.double(), k_cache, v_cache, slots, **call)
    with pytest.raises(ValueError, match="v_cache must have k_cache's strides"):
        rope_write_kv(qkv, cos, sin, k_cache, v_cache.contiguous(), slots, **call)
    with pytest.raises(ValueError, match="slot_mapping must be a torch.int64"):
        rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots.int(), **call)
    with pytest.raises(ValueError, match="k_cache must be a torch.float32"):
        rope_write_kv(qkv, cos, sin, k_cache.half(), v_cache.half(), slots, **call)
