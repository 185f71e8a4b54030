"""Loads the compiled kernels (`dfastllm._C`) and holds what every wrapper
shares: the dtype codes of csrc/kernels/params.h, the confidence modes
(checked against the extension's own table at import) and the device
arguments (device, index, stream) of a tensor.

There is deliberately no fallback to the references: a missing or stale
extension is an ImportError that says how to rebuild (`load_extension`).
"""

from __future__ import annotations

import torch

from dfastllm import load_extension
from dfastllm.sampling_params import Remasking

_C = load_extension("_C")

BUILT_WITH_CUDA: bool = bool(_C.with_cuda)

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# The confidence table is Remasking on this side and ConfidenceMode in
# params.h on the other; a build whose table differs cannot be used.
_PYTHON_MODES = {mode.name.lower(): int(mode) for mode in Remasking}
if dict(_C.confidence_modes) != _PYTHON_MODES:
    raise ImportError(
        f"dfastllm._C's confidence modes {dict(_C.confidence_modes)} differ from "
        f"dfastllm.sampling_params.Remasking {_PYTHON_MODES}: the extension is stale or the two tables drifted; "
        "make them agree and rebuild (pip install -e . --no-build-isolation)")


def device_args(tensor: torch.Tensor) -> dict:
    """device, device_index and stream keywords for a kernel call on tensor's device."""
    if tensor.device.type == "cpu":
        return {"device": "cpu", "device_index": 0, "stream": 0}
    if tensor.device.type != "cuda":
        raise ValueError(f"tensors must be on cpu or cuda, got {tensor.device}")
    if not BUILT_WITH_CUDA:
        raise ValueError(
            "got CUDA tensors but dfastllm._C was built without CUDA (no nvcc at build time, or "
            "DFASTLLM_CPU_ONLY=1); rebuild with nvcc on PATH: pip install -e . --no-build-isolation"
        )
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return {
        "device": "cuda",
        "device_index": index,
        "stream": torch.cuda.current_stream(index).cuda_stream,
    }


def check_vector(name: str, value: torch.Tensor, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-row argument as a contiguous 1-D tensor, or ValueError naming it."""
    if value.dtype != dtype:
        raise ValueError(f"{name} must be a {dtype} tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} must be on {device} like the other tensors, got {value.device}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(value.shape)}")
    return value.contiguous()


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_int64(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must be an int64 integer or tensor, got {value!r}")
    return value


def check_tensor(name: str, value, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor argument with this shape, dtype and device whose last dim is
    contiguous (any other strides), or ValueError naming it."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"{name} must be a {dtype} tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} must be on {device} like the other tensors, got {value.device}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    if value.dim() and value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {value.stride()}")
    return value


def as_rows(value: torch.Tensor) -> torch.Tensor:
    """[..., dim] as [rows, dim] of one row stride: a view when the leading
    dims flatten to one stride (a contiguous tensor, a slice of rows), else a
    contiguous copy (a slice of a slice), as `reshape` does."""
    return value.reshape(-1, value.shape[-1])


def row_stride(rows: torch.Tensor) -> int:
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]
