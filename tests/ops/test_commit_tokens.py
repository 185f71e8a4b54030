"""commit_tokens against its reference: top-k and threshold modes, the
"at least one" rule, already-committed candidates, ties, NaN confidences,
positions outside the canvas, random batches, and argument checks."""

from __future__ import annotations

import pytest
import torch

from dfastllm.ops import commit_tokens, commit_tokens_reference

from .conftest import DEVICES

MASK = 126336


def _batch(device, *, canvas, offsets, positions, tokens, confidence, k, threshold):
    return (
        torch.tensor(canvas, dtype=torch.int64, device=device),
        torch.tensor(offsets, dtype=torch.int32, device=device),
        torch.tensor(positions, dtype=torch.int64, device=device),
        torch.tensor(tokens, dtype=torch.int64, device=device),
        torch.tensor(confidence, dtype=torch.float32, device=device),
        torch.tensor(k, dtype=torch.int32, device=device),
        torch.tensor(threshold, dtype=torch.float32, device=device),
    )


def _run_both(args, mask_id=MASK):
    """Kernel on a copy of the canvas, reference on another: both results."""
    canvas, *rest = args
    kernel_canvas, ref_canvas = canvas.clone(), canvas.cpu().clone()
    committed = commit_tokens(kernel_canvas, *rest, mask_id)
    ref_committed = commit_tokens_reference(ref_canvas, *[r.cpu() for r in rest], mask_id)
    assert committed.dtype == torch.int32 and committed.device == canvas.device
    assert torch.equal(kernel_canvas.cpu(), ref_canvas), f"kernel\n{kernel_canvas}\nreference\n{ref_canvas}"
    assert torch.equal(committed.cpu(), ref_committed)
    return kernel_canvas.cpu(), committed.cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_skips_committed_and_breaks_ties_by_index(device):
    M = MASK
    args = _batch(
        device,
        canvas=[[5, M, M, M, M, 6], [M, M, M, M, M, M]],
        offsets=[0, 5, 9],
        # seq 0: position 0 is already committed (its 0.99 does not count)
        positions=[0, 1, 2, 3, 4, 0, 1, 2, 3],
        tokens=[10, 11, 12, 13, 14, 20, 21, 22, 23],
        confidence=[0.99, 0.3, 0.7, 0.3, 0.1, 0.5, 0.5, 0.5, 0.9],
        k=[2, 3],
        threshold=[0.0, 0.0],
    )
    canvas, committed = _run_both(args)
    assert committed.tolist() == [2, 3]
    assert canvas[0].tolist() == [5, 11, 12, M, M, 6]  # 0.7, then the first 0.3
    assert canvas[1].tolist() == [20, 21, M, 23, M, M]  # 0.9, then 0.5 ties by index


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_mode_commits_all_above_and_at_least_one(device):
    M = MASK
    args = _batch(
        device,
        canvas=[[M, M, M, M], [M, M, M, M], [1, 2, M, M], [M, M, M, M]],
        offsets=[0, 4, 7, 9, 9],
        positions=[0, 1, 2, 3, 0, 1, 2, 0, 1],
        tokens=[1, 2, 3, 4, 5, 6, 7, 8, 9],
        confidence=[0.95, 0.2, 0.9, 0.91, 0.3, 0.6, 0.6, 0.99, 0.99],
        k=[1, 1, 1, 1],  # ignored in threshold mode
        threshold=[0.9, 0.95, 0.5, 0.9],
    )
    canvas, committed = _run_both(args)
    assert committed.tolist() == [3, 1, 0, 0]
    assert canvas[0].tolist() == [1, M, 3, 4]      # 0.95, 0.9 (>=), 0.91
    assert canvas[1].tolist() == [M, 6, M, M]      # none >= 0.95: the best, lower index on tie
    assert canvas[2].tolist() == [1, 2, M, M]      # nothing eligible: nothing committed
    assert canvas[3].tolist() == [M, M, M, M]      # no candidates


@pytest.mark.parametrize("device", DEVICES)
def test_k_edge_cases_nan_and_out_of_range_positions(device):
    M = MASK
    nan = float("nan")
    args = _batch(
        device,
        canvas=[[M, M, M], [M, M, M], [M, M, M]],
        offsets=[0, 3, 6, 9],
        positions=[0, 1, 2, 0, 7, -1, 0, 1, 2],
        tokens=[1, 2, 3, 4, 5, 6, 7, 8, 9],
        confidence=[nan, 0.1, nan, 0.9, 0.95, 0.99, 0.2, 0.3, 0.4],
        k=[3, 5, 0],
        threshold=[0.0, 0.0, -1.0],
    )
    canvas, committed = _run_both(args)
    assert committed.tolist() == [3, 1, 0]          # NaN ranks last but still counts for k
    assert canvas[1].tolist() == [4, M, M]          # positions 7 and -1 are outside the canvas


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["top_k", "threshold"])
def test_random_batches_match_reference(device, mode, gen):
    for _ in range(5):
        batch, length = 9, 300
        canvas = torch.randint(0, 1000, (batch, length), generator=gen)
        canvas[torch.rand(batch, length, generator=gen) < 0.6] = MASK
        counts = torch.randint(0, 280, (batch,), generator=gen)
        counts[0] = 0
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        positions = torch.cat([torch.randperm(length, generator=gen)[:c] for c in counts.tolist()])
        n = int(counts.sum())
        # Coarse confidences make ties common.
        confidence = (torch.randint(0, 20, (n,), generator=gen) / 20).float()
        tokens = torch.randint(0, 1000, (n,), generator=gen)
        k = torch.randint(0, 40, (batch,), generator=gen).to(torch.int32)
        threshold = (torch.rand(batch, generator=gen) if mode == "threshold" else torch.zeros(batch)).float()
        args = [t.to(device) for t in (canvas, offsets, positions, tokens, confidence, k, threshold)]
        _run_both(args)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    canvas = torch.empty(0, 8, dtype=torch.int64, device=device)
    empty_i32 = torch.empty(0, dtype=torch.int32, device=device)
    empty_i64 = torch.empty(0, dtype=torch.int64, device=device)
    committed = commit_tokens(canvas, torch.zeros(1, dtype=torch.int32, device=device), empty_i64, empty_i64,
                              torch.empty(0, device=device), empty_i32, torch.empty(0, device=device), MASK)
    assert committed.shape == (0,) and committed.dtype == torch.int32


def _valid_args():
    return dict(
        canvas=torch.full((2, 4), MASK), cand_offsets=torch.tensor([0, 1, 2], dtype=torch.int32),
        cand_positions=torch.tensor([0, 1]), tokens=torch.tensor([3, 4]), confidence=torch.tensor([0.5, 0.6]),
        k=torch.ones(2, dtype=torch.int32), threshold=torch.zeros(2), mask_id=MASK,
    )


@pytest.mark.parametrize("name,value,fragment", [
    ("canvas", torch.zeros(2, 4, dtype=torch.int32), "canvas must be an int64"),
    ("canvas", torch.zeros(4, 2, dtype=torch.int64).t(), "contiguous"),
    ("cand_offsets", torch.tensor([0, 1, 2]), "cand_offsets must be a torch.int32"),
    ("cand_offsets", torch.tensor([0, 2], dtype=torch.int32), r"cand_offsets must have shape \[3\]"),
    ("tokens", torch.tensor([3]), r"tokens must have shape \[2\]"),
    ("confidence", torch.tensor([0.5, 0.6], dtype=torch.float64), "confidence must be a torch.float32"),
    ("k", torch.ones(2, dtype=torch.int64), "k must be a torch.int32"),
    ("threshold", torch.zeros(3), r"threshold must have shape \[2\]"),
    ("mask_id", 2**70, "mask_id"),
])
def test_invalid_arguments_are_named(name, value, fragment):
    args = _valid_args()
    args[name] = value
    with pytest.raises(ValueError, match=fragment):
        commit_tokens(**args)
