"""`add_rms_norm`: the residual add and the RMSNorm that follows it, one
pass over each row. Semantics: dfastllm/ops/reference.py
(`add_rms_norm_reference`)."""

from __future__ import annotations

import torch

from dfastllm.ops._extension import DTYPE_CODES, _C, as_rows, check_tensor, device_args, row_stride


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (and residual, same shape) and weight [D], one float dtype,
    last dim contiguous (rows of other strides are copied first). -> (weight * rms_norm(h), h) with h = x + residual
    (x itself without a residual), h in x's dtype and the norm in fp32."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.dtype not in DTYPE_CODES:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor [..., D], got "
                         f"{getattr(x, 'dtype', type(x))} {list(getattr(x, 'shape', []))}")
    check_tensor("x", x, x.shape, x.dtype, x.device)
    dim = x.shape[-1]
    check_tensor("weight", weight, (dim,), x.dtype, x.device)
    if residual is not None:
        check_tensor("residual", residual, x.shape, x.dtype, x.device)
    x_rows = as_rows(x)
    residual_rows = as_rows(residual) if residual is not None else None
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else None
    _C.add_rms_norm(
        **device_args(x),
        x=x_rows.data_ptr(),
        x_stride=row_stride(x_rows),
        residual=residual_rows.data_ptr() if residual is not None else 0,
        residual_stride=row_stride(residual_rows) if residual is not None else 0,
        weight=weight.data_ptr(),
        out=out.data_ptr(),
        residual_out=residual_out.data_ptr() if residual_out is not None else 0,
        dtype=DTYPE_CODES[x.dtype],
        rows=x_rows.shape[0],
        dim=dim,
        eps=float(eps),
        num_threads=torch.get_num_threads(),
    )
    return out, (x if residual is None else residual_out)
