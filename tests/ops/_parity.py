"""Comparison of the kernel with the reference that tolerates only what
floating point forces: a draw whose target lies within a hair of a CDF step
may land on either side, so such rows are left out of the token check."""

from __future__ import annotations

import torch

from dfastllm.ops import sample_tokens, sample_tokens_reference
from dfastllm.ops.reference import row_uniforms

# Relative distance of the draw's target to the nearest CDF step below which
# the float32 kernel and the float64 reference may disagree.
AMBIGUITY = 1e-5

CONFIDENCE_TOLERANCE = {  # (rtol, atol)
    "low_confidence": (1e-5, 1e-9),
    "random": (0.0, 0.0),
    "margin": (1e-5, 1e-7),
    "entropy": (1e-5, 1e-6),
}


def _per_row(value, n, dtype):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype)
    return torch.full((n,), value, dtype=dtype)


def decided_rows(logits, temperature, seed, offset) -> torch.Tensor:
    """bool [N]: rows whose token is not at the mercy of rounding."""
    n = logits.shape[0]
    x = logits.detach().cpu().double()
    x = torch.where(x.isnan(), float("-inf"), x)
    t = _per_row(temperature, n, torch.float64)
    seeds = _per_row(seed, n, torch.int64)
    offsets = offset.cpu() if isinstance(offset, torch.Tensor) else offset + torch.arange(n)
    u, _ = row_uniforms(seeds, offsets)
    greedy = ~(t > 0)
    p = torch.softmax(x / torch.where(greedy, 1.0, t)[:, None], dim=-1)
    cdf = torch.cumsum(p, dim=-1)
    target = u * cdf[:, -1]
    gap = (cdf - target[:, None]).abs().min(dim=-1).values
    return greedy | (gap > AMBIGUITY * cdf[:, -1])


def assert_matches_reference(logits, temperature, *, seed, offset=0, confidence="low_confidence", tempered=False,
                             selection_temperature=0.0):
    tokens, conf = sample_tokens(logits, temperature, seed=seed, offset=offset, confidence=confidence,
                                 tempered=tempered, selection_temperature=selection_temperature)
    cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
    ref_tokens, ref_conf = sample_tokens_reference(
        logits.cpu(), cpu(temperature), seed=cpu(seed), offset=cpu(offset), confidence=confidence,
        tempered=tempered, selection_temperature=cpu(selection_temperature)
    )
    assert tokens.dtype == torch.int64 and conf.dtype == torch.float32
    assert tokens.device == logits.device and conf.device == logits.device
    tokens, conf = tokens.cpu(), conf.cpu()
    decided = decided_rows(logits, temperature, seed, offset)
    assert decided.float().mean() >= 0.5, "too many ambiguous rows for a meaningful check"
    mismatch = (tokens != ref_tokens) & decided
    assert not mismatch.any(), (
        f"rows {mismatch.nonzero().flatten().tolist()}: kernel {tokens[mismatch].tolist()} "
        f"reference {ref_tokens[mismatch].tolist()}"
    )
    same = tokens == ref_tokens
    rtol, atol = CONFIDENCE_TOLERANCE[confidence]
    # A selection temperature s divides the confidence (and its error) by s.
    s = _per_row(selection_temperature, tokens.shape[0], torch.float32)
    atol = torch.where(s > 0, atol / s.clamp(min=1e-30) + 1e-6, atol)[same]
    diff = (conf[same].double() - ref_conf[same].double()).abs()
    bound = atol.double() + rtol * ref_conf[same].double().abs()
    both_nan = conf[same].isnan() & ref_conf[same].isnan()
    bad = ~both_nan & ~(diff <= bound)
    assert not bad.any(), (f"confidence rows {same.nonzero().flatten()[bad].tolist()}: kernel {conf[same][bad].tolist()} "
                           f"reference {ref_conf[same][bad].tolist()}")
    return tokens, conf
