"""The decoding algorithm of one denoising step, after the model's forward.

Per request, the candidates are the masked positions of its current block.
Only their hidden rows go through the output head ([N, V], never [B, L, V]);
one `sample_tokens` call per confidence mode present proposes a token and a
confidence for each, and one `commit_tokens` call writes the chosen ones into
the batch canvas on the device:

* top-k mode (LLaDA): the block's steps follow `num_transfer_tokens`;
* threshold mode (Fast-dLLM parallel decoding): every candidate at or above
  the threshold, at least the best one, so a block takes as many steps as
  the model's confidence needs (`steps` does not apply).

The host reads back only the candidates' cells afterwards (the step's one
synchronisation) and updates each request (`Request.apply_step`: block
advance, emitted prefix, EOS early stop).
"""

from __future__ import annotations

import torch

from dfastllm import ops


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


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep per row the most likely tokens whose probability
    mass first reaches top_p [n], -inf for the rest (Dream's `top_p_logits`)."""
    sorted_logits, order = logits.float().sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= top_p[:, None]
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_and_commit(head, hidden: torch.Tensor, batch, canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Propose and commit this step's tokens; -> the canvas cells at the
    candidate positions after the commit (mask_id where still masked), on the device.

    hidden [B, T, D] is the forward's output; `batch` a StepBatch (its
    candidate tensors); canvas [B, L] is updated in place."""
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.hidden_index)  # [N, D]
    logits = head(rows)  # [N, V]
    # Never propose the mask token: committing it would leave the cell masked
    # and a block whose model keeps predicting it would never finish. (The
    # public reference can commit it and then stalls the same way; a trained
    # model gives it ~0 probability, so this changes nothing there.)
    logits[:, mask_id] = float("-inf")
    if batch.top_p_rows is not None:
        filtered = top_p_filter(logits.index_select(0, batch.top_p_rows), batch.top_p_values)
        logits.index_copy_(0, batch.top_p_rows, filtered)

    if len(batch.mode_rows) == 1:
        (mode, _), = batch.mode_rows.items()
        tokens, confidence = ops.sample_tokens(logits, batch.temperature, seed=batch.seed,
                                               offset=batch.rng_offset, confidence=mode)
    else:  # a batch that mixes remasking rules: one kernel call per rule
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        confidence = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for mode, idx in batch.mode_rows.items():
            t, c = ops.sample_tokens(logits.index_select(0, idx), batch.temperature.index_select(0, idx),
                                     seed=batch.seed.index_select(0, idx),
                                     offset=batch.rng_offset.index_select(0, idx), confidence=mode)
            tokens.index_copy_(0, idx, t)
            confidence.index_copy_(0, idx, c)

    ops.commit_tokens(canvas, batch.cand_offsets, batch.cand_positions, tokens, confidence,
                      batch.commit_k, batch.threshold, mask_id)
    return canvas[batch.cand_rows, batch.cand_positions]
