"""`silu_mul`: SwiGLU's activation on the fused gate|up projection, one pass.
Semantics: dfastllm/ops/reference.py (`silu_mul_reference`)."""

from __future__ import annotations

import torch

from dfastllm.ops._extension import DTYPE_CODES, _C, as_rows, check_tensor, device_args, row_stride


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2 * F] (gate then up; float dtype, last dim contiguous)
    -> silu(gate) * up [..., F] in its dtype, silu rounded to it first."""
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() == 0 or gate_up.dtype not in DTYPE_CODES:
        raise ValueError(f"gate_up must be a float32/float16/bfloat16 tensor [..., 2 * F], got "
                         f"{getattr(gate_up, 'dtype', type(gate_up))} {list(getattr(gate_up, 'shape', []))}")
    check_tensor("gate_up", gate_up, gate_up.shape, gate_up.dtype, gate_up.device)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate | up), got {gate_up.shape[-1]}")
    dim = gate_up.shape[-1] // 2
    rows = as_rows(gate_up)
    out = torch.empty(*gate_up.shape[:-1], dim, dtype=gate_up.dtype, device=gate_up.device)
    if dim:
        _C.silu_mul(**device_args(gate_up), gate_up=rows.data_ptr(), gate_up_stride=row_stride(rows),
                    out=out.data_ptr(), dtype=DTYPE_CODES[gate_up.dtype], rows=rows.shape[0], dim=dim,
                    num_threads=torch.get_num_threads())
    return out
