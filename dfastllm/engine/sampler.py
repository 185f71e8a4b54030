"""The decoding algorithms of one denoising step, after the model's forward.

Per request, the candidates are the masked positions of its current block.
Only their hidden rows go through the output head ([N, V], never [B, L, V]);
one `sample_tokens` call per kind of confidence present proposes a token and
a confidence for each, and one `commit_tokens` call writes the chosen ones
into the batch canvas on the device. How many, and which, follows the
request's algorithm:

* LLaDA's block-wise decoding (`generate.py`): a block's steps commit
  `num_transfer_tokens` each, the most confident by `remasking`, with the
  confidence taken from softmax(logits) at any temperature.
* Dream's own decoding (`diffusion_generate`; a Dream model, block_length
  omitted): the whole answer is one block; step i of `steps` commits
  int(m * (1 - s/t)) of the m masked cells, t and s the timesteps i and
  i + 1 of linspace(1, eps, steps + 1), and all the rest at the last step.
  Token and confidence both come from softmax(top_k(top_p(logits / T)))
  (`tempered` kernel rows); `alg` names the confidence (maskgit_plus: the
  token's probability, topk_margin: top-1 minus top-2, entropy: negative
  entropy). The cells taken are the top n, or with `alg_temp` > 0 n drawn
  without replacement from softmax(confidence / alg_temp) (Gumbel top-k in
  the kernel). `origin` commits each masked cell with probability 1 - s/t:
  the request draws that Binomial count and the kernel's uniform
  confidences pick a uniformly random subset of that size, which is the
  same distribution. A step whose count is 0 changes nothing, so it is
  skipped rather than run.
* Threshold decoding (Fast-dLLM; Dream's `confidence_threshold`): every
  candidate whose confidence reaches the threshold, at least the best one,
  so a block takes as many steps as the model's confidence needs (`steps`
  does not apply). Dream's own decoding ranks by the token's probability
  under the tempered, filtered distribution.

Top-p and top-k filter the logits / T of every request before the kernel
(Dream's `top_p_logits` and `top_k_logits`); the mask token is never proposed.

The host reads back only the candidates' cells afterwards (the step's one
synchronisation) and updates each request (`Request.apply_step`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dfastllm import ops
from dfastllm.sampling_params import Remasking


def split_steps(total_steps: int, block_sizes: list[int]) -> list[int]:
    """Steps per block: LLaDA's `steps // num_blocks` when it divides, else as
    even as possible (the first blocks get one more), at least one per block.
    A block never gets more steps than it has tokens: a step that could commit
    nothing would only cost a forward (this only bites a short last block)."""
    n = len(block_sizes)
    total_steps = max(total_steps, n)
    base, extra = divmod(total_steps, n)
    return [min(base + (i < extra), size) for i, size in enumerate(block_sizes)]


def num_transfer_tokens(masked: int, steps: int) -> list[int]:
    """LLaDA's `get_num_transfer_tokens`: how many of `masked` tokens each of
    `steps` steps commits: masked // steps each, the first masked % steps one more."""
    base, extra = divmod(masked, steps)
    return [base + (i < extra) for i in range(steps)]


def dream_transfer_ratios(steps: int, eps: float) -> np.ndarray:
    """Dream's schedule, float32 [steps]: step i commits int(m * ratio[i]) of
    the m cells still masked, ratio = 1 - s/t for the timesteps t, s = i, i + 1
    of linspace(1, eps, steps + 1), computed in float32 as the published code
    does (the count is a truncation, so the rounding is part of the rule);
    the last ratio is 1: everything left."""
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    ratios = (1 - timesteps[1:] / timesteps[:-1]).numpy()
    ratios[-1] = 1.0
    return ratios


def dream_commit_count(masked: int, ratio: np.float32) -> int:
    """int(m * (1 - s/t)) in float32, as Dream's `number_transfer_tokens`."""
    return int(np.float32(masked) * ratio)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  top_k: torch.Tensor) -> torch.Tensor:
    """Dream's `top_p_logits` then `top_k_logits` on logits / t per row (on
    the logits themselves where t = 0): -inf for the dropped tokens, the kept
    ones unchanged (the kernel applies the temperature).

    top_p [n]: keep the most likely tokens until the mass before one passes
    top_p (1 keeps all); top_k [n] int64: keep those at least as likely as the
    k-th (0 keeps all)."""
    scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = torch.zeros_like(mass, dtype=torch.bool)
    # top_p = 1 keeps all, even where the running sum rounds past 1.
    drop_sorted[:, 1:] = (mass[:, :-1] > top_p[:, None]) & (top_p[:, None] < 1.0)
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    drop_sorted |= sorted_logits < kth
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# A kernel call: the confidence and whether it is taken at the temperature.
SamplingGroup = tuple[Remasking, bool]


@dataclasses.dataclass
class SamplingInputs:
    """One step's sampling and commit inputs, on the device; per candidate
    unless noted (N candidates; R canvas rows, stepped or not)."""
    temperature: torch.Tensor  # [N] float32
    seed: torch.Tensor  # [N] int64
    rng_offset: torch.Tensor  # [N] int64, unique per (request step, position)
    selection_temperature: torch.Tensor | None  # [N] float32 (alg_temp), None when no request has one
    filter_rows: torch.Tensor | None  # [F] candidates to top-p/top-k filter, None when none
    top_p: torch.Tensor | None  # [F] float32
    top_k: torch.Tensor | None  # [F] int64, 0 = all
    groups: dict[SamplingGroup, torch.Tensor | None]  # kernel call -> its candidates (None: all)
    commit_k: torch.Tensor  # [R] int32 (top-k mode)
    threshold: torch.Tensor  # [R] float32 (> 0: threshold mode)


class SamplingPlan:
    """The host side of SamplingInputs: arrays the step uploads together with
    its other inputs (`ints` as int64, `floats` as float32), then `on_device`.

    The commit kernel runs over every canvas row (`canvas_rows`; request i is
    in row `slots[i]`): a row that does not step has no candidates
    (`row_offsets`), commit count 0 and threshold 0."""

    def __init__(self, requests, counts: np.ndarray, cand_pos: np.ndarray, lengths: np.ndarray, *,
                 slots: np.ndarray, canvas_rows: int):
        rows = np.repeat(np.arange(len(requests)), counts)
        per_cand = lambda values, dtype: np.repeat(np.array(values, dtype=dtype), counts)  # noqa: E731

        def per_canvas_row(values, dtype):
            out = np.zeros(canvas_rows, dtype=dtype)
            out[slots] = values
            return out

        self.row_offsets = np.concatenate([[0], np.cumsum(per_canvas_row(counts, np.int64))])
        seeds = per_cand([r.seed for r in requests], np.int64)
        rng_offset = per_cand([r.num_steps for r in requests], np.int64) * lengths[rows] + cand_pos
        commit_k = per_canvas_row([r.commit_count() for r in requests], np.int64)
        top_p = per_cand([r.params.top_p for r in requests], np.float32)
        top_k = per_cand([r.params.top_k or 0 for r in requests], np.int64)
        filter_rows = np.flatnonzero((top_p < 1.0) | (top_k > 0))
        alg_temp = per_cand([r.alg_temp for r in requests], np.float32)
        self.has_alg_temp = bool((alg_temp > 0).any())

        keys = [(r.confidence, r.tempered) for r in requests]
        self.group_keys = sorted(set(keys))
        group_index = []
        if len(self.group_keys) > 1:
            row_group = per_cand([self.group_keys.index(k) for k in keys], np.int64)
            group_index = [np.flatnonzero(row_group == j) for j in range(len(self.group_keys))]
        self.has_filter = bool(filter_rows.size)
        self.ints = [seeds, rng_offset, commit_k, filter_rows, top_k[filter_rows], *group_index]
        self.floats = [per_cand([r.params.temperature for r in requests], np.float32),
                       per_canvas_row([r.threshold for r in requests], np.float32), top_p[filter_rows],
                       alg_temp if self.has_alg_temp else alg_temp[:0]]

    def on_device(self, ints: list[torch.Tensor], floats: list[torch.Tensor]) -> SamplingInputs:
        seeds, rng_offset, commit_k, filter_rows, top_k, *group_rows = ints
        temperature, threshold, top_p, alg_temp = floats
        groups = dict(zip(self.group_keys, group_rows)) if group_rows else {self.group_keys[0]: None}
        return SamplingInputs(
            temperature=temperature, seed=seeds, rng_offset=rng_offset,
            selection_temperature=alg_temp if self.has_alg_temp else None,
            filter_rows=filter_rows if self.has_filter else None, top_p=top_p if self.has_filter else None,
            top_k=top_k if self.has_filter else None, groups=groups,
            commit_k=commit_k.to(torch.int32), threshold=threshold)


def propose(logits: torch.Tensor, s: SamplingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter the candidates' logits [N, V] in place and draw a token and a
    confidence for each; one kernel call per sampling group."""
    if s.filter_rows is not None:
        filtered = filter_logits(logits.index_select(0, s.filter_rows), s.temperature.index_select(0, s.filter_rows),
                                 s.top_p, s.top_k)
        logits.index_copy_(0, s.filter_rows, filtered)
    selection = s.selection_temperature if s.selection_temperature is not None else 0.0
    if len(s.groups) == 1:
        ((mode, tempered), _), = s.groups.items()
        return ops.sample_tokens(logits, s.temperature, seed=s.seed, offset=s.rng_offset, confidence=mode,
                                 tempered=tempered, selection_temperature=selection)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    confidence = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for (mode, tempered), idx in s.groups.items():
        t, c = ops.sample_tokens(
            logits.index_select(0, idx), s.temperature.index_select(0, idx), seed=s.seed.index_select(0, idx),
            offset=s.rng_offset.index_select(0, idx), confidence=mode, tempered=tempered,
            selection_temperature=selection if isinstance(selection, float) else selection.index_select(0, idx))
        tokens.index_copy_(0, idx, t)
        confidence.index_copy_(0, idx, c)
    return tokens, confidence


def sample_and_commit(head, hidden: torch.Tensor, batch, canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Propose and commit this step's tokens; -> the canvas cells at the
    candidate positions after the commit (mask_id where still masked), on the device.

    hidden [N, D] is the packed forward's output; `batch` a StepBatch (its
    candidate tensors and `sampling` inputs); canvas [canvas rows, L] is
    updated in place."""
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.hidden_index)  # [N, D]
    logits = head(rows)  # [N, V]
    # Never propose the mask token: committing it would leave the cell masked
    # and a block whose model keeps predicting it would never finish. (The
    # public references can commit it and then stall the same way; a trained
    # model gives it ~0 probability, so this changes nothing there.)
    logits[:, mask_id] = float("-inf")
    tokens, confidence = propose(logits, batch.sampling)
    s = batch.sampling
    ops.commit_tokens(canvas, batch.cand_offsets, batch.cand_positions, tokens, confidence, s.commit_k,
                      s.threshold, mask_id)
    return canvas[batch.cand_rows, batch.cand_positions]
