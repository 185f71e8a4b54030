"""`rope_write_kv`: RoPE on q and k of the fused q|k|v projection and the
write of k and v into a paged KV cache, in one pass over the tokens.
Semantics: dfastllm/ops/reference.py (`rope_write_kv_reference`).

The cache of a layer is [num_pages, page_size, n_kv_heads, head_dim] with
any strides but the last (a dense [B, Hkv, S, D] cache is the paged one
`cache.transpose(1, 2)`: one page of S slots per row); token (b, t) goes to
slot `slot_mapping[b, t]` = page * page_size + offset, and a slot outside
the pool (padding: -1) writes nothing."""

from __future__ import annotations

import torch

from dfastllm.ops._extension import DTYPE_CODES, _C, check_tensor, device_args


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, *, n_heads: int, rotate_in_fp32: bool,
                  q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, T, (H + 2 Hkv) * D] (float dtype, last dim contiguous); cos, sin
    float32 [B, T, D/2] contiguous (angle of pair (j, j + D/2)); k_cache,
    v_cache [P, S, Hkv, D] in qkv's dtype, with the same strides; slot_mapping
    int64 [B, T] contiguous. rotate_in_fp32: rotate in fp32 and round once
    (LLaDA) or in qkv's dtype with cos/sin rounded to it (Qwen2/Dream).
    -> q rotated, [B, T, H, D] (into q_out when given, any strides but the last)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3 or qkv.dtype not in DTYPE_CODES:
        raise ValueError(f"qkv must be a float32/float16/bfloat16 tensor [B, T, (H + 2 Hkv) * D], got "
                         f"{getattr(qkv, 'dtype', type(qkv))} {list(getattr(qkv, 'shape', []))}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k_cache must be a tensor [P, S, Hkv, D], got {list(getattr(k_cache, 'shape', []))}")
    B, T, width = qkv.shape
    P, S, n_kv_heads, head_dim = k_cache.shape
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    if head_dim % 2 or width != (n_heads + 2 * n_kv_heads) * head_dim:
        raise ValueError(f"qkv's last dim {width} must be (n_heads {n_heads} + 2 * n_kv_heads {n_kv_heads}) "
                         f"* head_dim {head_dim} (even)")
    device = qkv.device
    check_tensor("qkv", qkv, qkv.shape, qkv.dtype, device)
    check_tensor("cos", cos, (B, T, head_dim // 2), torch.float32, device)
    check_tensor("sin", sin, (B, T, head_dim // 2), torch.float32, device)
    check_tensor("k_cache", k_cache, k_cache.shape, qkv.dtype, device)
    check_tensor("v_cache", v_cache, k_cache.shape, qkv.dtype, device)
    check_tensor("slot_mapping", slot_mapping, (B, T), torch.int64, device)
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache must have k_cache's strides {k_cache.stride()}, got {v_cache.stride()}")
    for name, t in (("cos", cos), ("sin", sin), ("slot_mapping", slot_mapping)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if q_out is None:
        q_out = torch.empty(B, T, n_heads, head_dim, dtype=qkv.dtype, device=device)
    check_tensor("q_out", q_out, (B, T, n_heads, head_dim), qkv.dtype, device)
    _C.rope_write_kv(
        **device_args(qkv),
        qkv=qkv.data_ptr(), qkv_stride_b=qkv.stride(0), qkv_stride_t=qkv.stride(1),
        cos=cos.data_ptr(), sin=sin.data_ptr(),
        q_out=q_out.data_ptr(), q_stride_b=q_out.stride(0), q_stride_t=q_out.stride(1), q_stride_h=q_out.stride(2),
        k_cache=k_cache.data_ptr() if k_cache.numel() else 0, v_cache=v_cache.data_ptr() if v_cache.numel() else 0,
        cache_stride_page=k_cache.stride(0), cache_stride_slot=k_cache.stride(1), cache_stride_head=k_cache.stride(2),
        num_pages=P if k_cache.numel() else 0, page_size=max(S, 1),
        slot_mapping=slot_mapping.data_ptr(),
        dtype=DTYPE_CODES[qkv.dtype], batch=B, tokens=T, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, rotate_in_fp32=bool(rotate_in_fp32), num_threads=torch.get_num_threads(),
    )
    return q_out
