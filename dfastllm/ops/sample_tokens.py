"""`sample_tokens`: the fused sampling kernel (one read of each logits row).
Semantics, NaN handling and the random-number scheme:
dfastllm/ops/reference.py, whose `sample_tokens_reference` it matches."""

from __future__ import annotations

import math

import torch

from dfastllm.ops._extension import DTYPE_CODES, _C, check_int64, check_vector, device_args
from dfastllm.ops.reference import confidence_mode
from dfastllm.sampling_params import Remasking


def sample_tokens(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    offset: int | torch.Tensor = 0,
    confidence: Remasking | str = Remasking.LOW_CONFIDENCE,
    tempered: bool = False,
    selection_temperature: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row of logits [N, V] (bf16/fp16/fp32, last dim
    contiguous, any row stride).

    temperature: float >= 0, or a float32 tensor [N] (<= 0 means greedy).
    seed: int, or int64 tensor [N]. offset: int (row r uses offset + r), or
    int64 tensor [N]. confidence: a Remasking member or its lower-case name.
    tempered: the token and its confidence both from softmax(logits / t)
    (Dream) rather than the confidence from softmax(logits) (LLaDA).
    selection_temperature: float >= 0 or a float32 tensor [N]; > 0 adds
    Gumbel noise to confidence / s (Dream's alg_temp selection).
    -> (tokens int64 [N], confidence float32 [N]), on logits' device; no host
    synchronisation.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [N, V], got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in DTYPE_CODES:
        raise TypeError(f"logits must be bfloat16, float16 or float32, got {logits.dtype}")
    n_rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have V > 0 columns, got V = 0")
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous in the last dim, got strides {logits.stride()}")
    mode = confidence_mode(confidence)
    device = logits.device
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    conf = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return tokens, conf

    # Per-row tensors (the last of each triple) stay referenced until the
    # launch is queued; the caching allocator orders their reuse on this stream.
    temperature_ptr, temperature_scalar, _t = _per_row("temperature", temperature, n_rows, torch.float32, device)
    seed_ptr, seed_scalar, _s = _per_row("seed", seed, n_rows, torch.int64, device)
    offset_ptr, offset_scalar, _o = _per_row("offset", offset, n_rows, torch.int64, device)
    selection_ptr, selection_scalar, _st = _per_row("selection_temperature", selection_temperature, n_rows,
                                                    torch.float32, device)

    _C.sample_tokens(
        **device_args(logits),
        logits=logits.data_ptr(),
        dtype=DTYPE_CODES[logits.dtype],
        n_rows=n_rows,
        vocab=vocab,
        row_stride=logits.stride(0) if n_rows > 1 else vocab,
        temperature=temperature_ptr,
        temperature_scalar=temperature_scalar,
        seed=seed_ptr,
        seed_scalar=seed_scalar,
        offset=offset_ptr,
        offset_scalar=offset_scalar,
        confidence_mode=int(mode),
        tempered_confidence=bool(tempered),
        selection_temperature=selection_ptr,
        selection_temperature_scalar=selection_scalar,
        tokens=tokens.data_ptr(),
        confidence=conf.data_ptr(),
        num_threads=torch.get_num_threads(),
    )
    return tokens, conf


def _per_row(name: str, value, n_rows: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """A per-row argument as (pointer, scalar, tensor): a `dtype` tensor
    [n_rows] gives its pointer; otherwise a scalar (pointer 0), for float32 a
    finite float >= 0, for int64 an int64 integer."""
    if isinstance(value, torch.Tensor):
        value = check_vector(name, value, n_rows, dtype, device)
        return value.data_ptr(), 0, value
    if dtype == torch.int64:
        return 0, check_int64(name, value), None
    scalar = float(value)
    if not (math.isfinite(scalar) and scalar >= 0.0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return 0, scalar, None
