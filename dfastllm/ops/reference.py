"""Plain-torch references of the fused kernels: the executable definition of
what `dfastllm.ops.sample_tokens` and `commit_tokens` compute.

They are slow on purpose (float64, whole-row tensors, a Python loop per
sequence) and only serve the parity tests, the benchmark baseline and anyone
who wants to read the semantics in one place.

Semantics shared with the kernels
---------------------------------
* Logits: NaN is treated as -inf (never chosen, probability 0). A row with no
  finite logit gives token 0 and a NaN confidence (the "random" confidence is
  still its draw). +inf logits are not supported (the result is unspecified).
* Random numbers: Philox4x32-10 with key = seed_r (low word, high word) and
  counter = (offset_r low, offset_r high, 0, 0). Its four outputs give
  u_sample = 53 bits of (x0, x1) as a float64 in [0, 1) and
  u_conf = 24 bits of x2 as a float32 in [0, 1). A row's draws depend only on
  (seed_r, offset_r), never on the batch it sits in.
* temperature <= 0 (or NaN): greedy argmax, first index on ties.
  temperature > 0: an exact draw from softmax(logits / t) by inverse CDF over
  the row in column order: the first column whose running sum of
  probabilities exceeds u_sample (never a zero-probability column).
* Confidence (a `Remasking` member or its lower-case name), from
  p = softmax(logits) whatever the temperature (the LLaDA reference's rule):
  "low_confidence" p[token]; "random" u_conf; "margin" p_top1 - p_top2
  (duplicates count: two equal maxima give 0; V = 1 gives 1);
  "entropy" sum p log p (negative entropy, <= 0).
* tempered=True (Dream's rule): for a row with t > 0 the token and its
  confidence both come from softmax(logits / t), as if the row were
  logits / t sampled at temperature 1 (t <= 0 stays greedy with the
  confidence from softmax(logits)).
* selection_temperature s > 0 (per row; Dream's alg_temp): the confidence
  output becomes float32(confidence / s + g), g = -log(-log(u_conf + 2^-25))
  a Gumbel draw, so that the top n outputs of a sequence are a draw without
  replacement from softmax(confidence / s) (Gumbel top-k).
* commit_tokens: a candidate is eligible when its position lies in [0, L)
  and canvas[b, position] == mask_id before the call. Candidates are ranked
  by confidence (NaN ranks lowest), ties by lower candidate index. Top-k
  mode commits the min(k, eligible) best; threshold mode (threshold[b] > 0)
  commits every eligible candidate with confidence >= threshold and at
  least the best one. Positions must be distinct within a sequence.
"""

from __future__ import annotations

import torch

from dfastllm.sampling_params import Remasking

CONFIDENCE_MODES = tuple(mode.name.lower() for mode in Remasking)


def confidence_mode(confidence: Remasking | str) -> Remasking:
    """A Remasking member, or its lower-case name; ValueError otherwise."""
    if isinstance(confidence, Remasking):
        return confidence
    if confidence not in CONFIDENCE_MODES:
        raise ValueError(f"confidence must be a Remasking or one of {CONFIDENCE_MODES}, got {confidence!r}")
    return Remasking[confidence.upper()]

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a 32-bit constant a and int64
    tensor b holding 32-bit values, without overflowing int64."""
    p_lo = b * (a & 0xFFFF)  # < 2^48
    p_hi = b * (a >> 16)  # < 2^48
    low = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    high = (p_hi >> 16) + (low >> 32)
    return high & _MASK32, low & _MASK32


def philox4x32_10(counter: list[torch.Tensor], key: list[torch.Tensor]) -> list[torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding 32-bit words."""
    c0, c1, c2, c3 = (c & _MASK32 for c in counter)
    k0, k1 = (k & _MASK32 for k in key)
    for round_index in range(10):
        if round_index:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def row_uniforms(seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_sample float64 [N], u_conf float32 [N]) for int64 seed/offset [N]."""
    zero = torch.zeros_like(offset)
    x0, x1, x2, _ = philox4x32_10(
        [offset & _MASK32, (offset >> 32) & _MASK32, zero, zero],
        [seed & _MASK32, (seed >> 32) & _MASK32],
    )
    u_sample = ((x0 << 21) | (x1 >> 11)).double() * 2.0**-53
    u_conf = ((x2 >> 8).double() * 2.0**-24).float()
    return u_sample, u_conf


def _per_row(value, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(n)
    return torch.full((n,), value, dtype=dtype, device=device)


def sample_tokens_reference(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    offset: int | torch.Tensor = 0,
    confidence: Remasking | str = Remasking.LOW_CONFIDENCE,
    tempered: bool = False,
    selection_temperature: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens int64 [N], confidence float32 [N]); see the module docstring."""
    mode = confidence_mode(confidence)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, V] with V > 0, got shape {tuple(logits.shape)}")
    n, _ = logits.shape
    device = logits.device
    x = logits.double()  # [N, V]
    x = torch.where(torch.isnan(x), float("-inf"), x)
    t = _per_row(temperature, n, torch.float64, device)
    seeds = _per_row(seed, n, torch.int64, device)
    if isinstance(offset, torch.Tensor):
        offsets = offset.to(device=device, dtype=torch.int64).reshape(n)
    else:
        offsets = offset + torch.arange(n, dtype=torch.int64, device=device)
    u_sample, u_conf = row_uniforms(seeds, offsets)
    if tempered:  # logits / t at temperature 1
        scaled = ~(t.isnan() | (t <= 0) | (1.0 / t.float()).isinf())
        x = torch.where(scaled[:, None], x / torch.where(scaled, t, 1.0)[:, None], x)
        t = torch.where(scaled, 1.0, t)

    row_max = x.max(dim=-1).values  # [N]
    dead = row_max == float("-inf")  # rows with no finite logit
    safe_x = torch.where(dead[:, None], 0.0, x)
    log_z = torch.logsumexp(safe_x, dim=-1)  # [N], temperature 1

    greedy = t.isnan() | (t <= 0)
    tokens = safe_x.argmax(dim=-1)  # first index on ties
    sampled = (~greedy & ~dead).nonzero().squeeze(-1)
    if sampled.numel():
        p_t = torch.softmax(safe_x[sampled] / t[sampled, None], dim=-1)  # [S, V]
        cdf = torch.cumsum(p_t, dim=-1)
        target = u_sample[sampled] * cdf[:, -1]
        drawn = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
        # Rounding can leave the target at or past the end of the CDF: take
        # the last column that has probability.
        last_live = p_t.shape[1] - 1 - (p_t > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
        tokens[sampled] = torch.minimum(drawn, last_live)
    tokens = torch.where(dead, 0, tokens)

    if mode == Remasking.LOW_CONFIDENCE:
        conf = (safe_x.gather(-1, tokens[:, None]).squeeze(-1) - log_z).exp()
    elif mode == Remasking.RANDOM:
        conf = u_conf.double()
    elif mode == Remasking.MARGIN:
        if safe_x.shape[1] == 1:
            conf = torch.ones(n, dtype=torch.float64, device=device)
        else:
            top2 = (safe_x.topk(2, dim=-1).values - log_z[:, None]).exp()
            conf = top2[:, 0] - top2[:, 1]
    else:
        log_p = safe_x - log_z[:, None]
        p = log_p.exp()
        conf = torch.where(p > 0, p * log_p, 0.0).sum(-1)
    if mode != Remasking.RANDOM:
        conf = torch.where(dead, float("nan"), conf)
    conf = conf.float()
    s = _per_row(selection_temperature, n, torch.float32, device)
    gumbel = -torch.log(-torch.log(u_conf.double() + 2.0**-25))
    perturbed = (conf.double() / s.double() + gumbel).float()
    return tokens, torch.where(s > 0, perturbed, conf)


def commit_tokens_reference(
    canvas: torch.Tensor,
    cand_offsets: torch.Tensor,
    cand_positions: torch.Tensor,
    tokens: torch.Tensor,
    confidence: torch.Tensor,
    k: torch.Tensor,
    threshold: torch.Tensor,
    mask_id: int,
) -> torch.Tensor:
    """Writes the chosen tokens into canvas [B, L] in place; -> committed int32 [B]."""
    batch, length = canvas.shape
    committed = torch.zeros(batch, dtype=torch.int32, device=canvas.device)
    offsets = cand_offsets.tolist()
    for b in range(batch):
        lo, hi = offsets[b], offsets[b + 1]
        pos = cand_positions[lo:hi]
        in_range = (pos >= 0) & (pos < length)
        current = canvas[b, pos.clamp(0, length - 1)]
        eligible = in_range & (current == mask_id)
        if not bool(eligible.any()):
            continue
        conf = confidence[lo:hi].float()
        conf = torch.where(conf.isnan(), float("-inf"), conf)
        idx = eligible.nonzero().squeeze(-1)  # ascending candidate index
        # Stable sort keeps the lower index first among equal confidences.
        order = idx[torch.sort(conf[idx], descending=True, stable=True).indices]
        thr = float(threshold[b])
        if thr > 0:
            chosen = order[conf[order] >= thr]
            if chosen.numel() == 0:
                chosen = order[:1]
        else:
            chosen = order[: max(int(k[b]), 0)]
        canvas[b, pos[chosen]] = tokens[lo:hi][chosen].to(canvas.dtype)
        committed[b] = chosen.numel()
    return committed


# ---- transformer-layer kernels: add_rms_norm, rope_write_kv, silu_mul --------
# Written the way both families' reference code computes (sums and products
# in the model's dtype; the norm, and LLaDA's RoPE, in fp32), so a kernel that
# matches them keeps the forward's numerics where the checkpoints' own code has them.

def add_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weight * rms_norm(h), h), h = x + residual in x's dtype (x without
    one); the norm in fp32, cast back to the dtype before the weight."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed, h


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] -> silu(gate) * up [..., F], each op in the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_write_kv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor, *, n_heads: int,
                            rotate_in_fp32: bool) -> torch.Tensor:
    """qkv [B, T, (H + 2 Hkv) * D]; cos/sin fp32 [B, T, D/2]; caches [P, S, Hkv, D]
    written in place at slot_mapping [B, T] (page * S + offset; outside
    [0, P * S) nothing is written). Half-split rotation x * cos + rotate_half(x) * sin
    in fp32 (rotate_in_fp32, LLaDA) or in the dtype with cos/sin cast to it
    (Qwen2/Dream), cast back. -> q [B, T, H, D]."""
    B, T, _ = qkv.shape
    P, S, n_kv_heads, head_dim = k_cache.shape
    q, k, v = qkv.view(B, T, -1, head_dim).split([n_heads, n_kv_heads, n_kv_heads], dim=2)
    dtype = torch.float32 if rotate_in_fp32 else qkv.dtype
    c = torch.cat([cos, cos], dim=-1)[:, :, None].to(dtype)                    # [B, T, 1, D]
    s = torch.cat([sin, sin], dim=-1)[:, :, None].to(dtype)

    def rotate(x):
        xr = x.to(dtype)
        x1, x2 = xr.chunk(2, dim=-1)
        return (xr * c + torch.cat([-x2, x1], dim=-1) * s).to(x.dtype)

    slots = slot_mapping.reshape(-1)
    keep = (slots >= 0) & (slots < P * S)
    pages, offsets = slots[keep] // S, slots[keep] % S
    k_cache[pages, offsets] = rotate(k).reshape(B * T, n_kv_heads, head_dim)[keep]
    v_cache[pages, offsets] = v.reshape(B * T, n_kv_heads, head_dim)[keep]
    return rotate(q)
