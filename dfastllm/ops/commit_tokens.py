"""`commit_tokens`: per sequence, pick which candidates to commit and write
them into the canvas in place, on the device, with no host synchronisation.
Semantics: dfastllm/ops/reference.py (`commit_tokens_reference`)."""

from __future__ import annotations

import torch

from dfastllm.ops._extension import _C, check_int64, check_vector, device_args


def commit_tokens(
    canvas: torch.Tensor,
    cand_offsets: torch.Tensor,
    cand_positions: torch.Tensor,
    tokens: torch.Tensor,
    confidence: torch.Tensor,
    k: torch.Tensor,
    threshold: torch.Tensor,
    mask_id: int,
) -> torch.Tensor:
    """canvas int64 [B, L] (last dim contiguous) is updated in place.

    Candidates of sequence b are rows cand_offsets[b]:cand_offsets[b+1]
    (int32 [B+1]) of cand_positions (int64 [N], positions in canvas row b),
    tokens (int64 [N]) and confidence (float32 [N]). k int32 [B]: top-k
    count; threshold float32 [B]: when > 0, commit every still-masked
    candidate at or above it and at least the best one. -> committed int32 [B].
    """
    if not isinstance(canvas, torch.Tensor) or canvas.dim() != 2 or canvas.dtype != torch.int64:
        raise ValueError(f"canvas must be an int64 tensor [B, L], got {getattr(canvas, 'dtype', type(canvas))} "
                         f"{list(getattr(canvas, 'shape', []))}")
    batch, length = canvas.shape
    if length > 1 and canvas.stride(1) != 1:
        raise ValueError(f"canvas must be contiguous in the last dim, got strides {canvas.stride()}")
    device = canvas.device
    if not isinstance(cand_positions, torch.Tensor) or cand_positions.dim() != 1:
        raise ValueError("cand_positions must be a 1-D int64 tensor [N]")
    n_cand = cand_positions.shape[0]
    cand_offsets = check_vector("cand_offsets", cand_offsets, batch + 1, torch.int32, device)
    cand_positions = check_vector("cand_positions", cand_positions, n_cand, torch.int64, device)
    tokens = check_vector("tokens", tokens, n_cand, torch.int64, device)
    confidence = check_vector("confidence", confidence, n_cand, torch.float32, device)
    k = check_vector("k", k, batch, torch.int32, device)
    threshold = check_vector("threshold", threshold, batch, torch.float32, device)
    mask_id = check_int64("mask_id", mask_id)
    committed = torch.empty(batch, dtype=torch.int32, device=device)
    if batch == 0:
        return committed
    # The CUDA kernel snapshots "still masked" here before writing the canvas.
    eligible = torch.empty(n_cand if device.type == "cuda" else 0, dtype=torch.uint8, device=device)
    _C.commit_tokens(
        **device_args(canvas),
        canvas=canvas.data_ptr(),
        batch=batch,
        length=length,
        canvas_stride=canvas.stride(0) if batch > 1 else length,
        cand_offsets=cand_offsets.data_ptr(),
        cand_positions=cand_positions.data_ptr(),
        tokens=tokens.data_ptr(),
        confidence=confidence.data_ptr(),
        n_cand=n_cand,
        k=k.data_ptr(),
        threshold=threshold.data_ptr(),
        mask_id=mask_id,
        committed=committed.data_ptr(),
        eligible=eligible.data_ptr() if eligible.numel() else 0,
        num_threads=torch.get_num_threads(),
    )
    return committed
