"""One request's decoding state on the host, and what a step reports for it.

The device holds the truth of the canvas (`commit_tokens` writes into it);
the host keeps a mirror of the generated part, refreshed from the one read
per step, so that the schedule, the candidate positions and the emitted
prefix are all decided without touching the device again.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from dfastllm.engine.sampler import dream_commit_count, dream_transfer_ratios, num_transfer_tokens, split_steps
from dfastllm.sampling_params import DEFAULT_EPS, DreamAlg, SamplingParams

FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    # Tokens that became final since the last output: the contiguous
    # committed prefix of the generation, stop token excluded.
    new_token_ids: list[int]
    finish_reason: str | None  # None | "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generated_tokens: int
    num_steps: int
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    """A request from admission to its final output.

    Positions: the canvas is prompt (P tokens) + max_tokens masks; generation
    index g is canvas position P + g. Blocks cover the generation in order;
    under Dream's own decoding (`whole_canvas`) one block covers all of it.
    `family` is the model's ("llada", "dream"): with the params it decides
    the algorithm (sampler.py). LLaDA2's rules are a subclass
    (llada2_decoding.py)."""

    # Attention is bidirectional (0) or block-causal in blocks of this length (LLaDA2).
    attention_block = 0

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, seed: int,
                 mask_id: int, stop_ids: frozenset[int], deadline: float | None, arrival: float,
                 family: str = "llada"):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.mask_id = mask_id
        self.stop_ids = stop_ids
        self.deadline = deadline
        self.arrival = arrival
        self.first_step_at: float | None = None  # when the request first ran (queue time)

        self.prompt_len = len(prompt_ids)
        self.gen_len = params.max_tokens
        self.canvas_len = self.prompt_len + self.gen_len
        self.whole_canvas = params.decodes_whole_canvas(family)
        size = self.gen_len if self.whole_canvas else params.effective_block_length
        self.block_starts = list(range(0, self.gen_len, size))  # generation indices
        self.block_sizes = [min(size, self.gen_len - s) for s in self.block_starts]
        # Top-k mode: tokens each step of each block commits.
        self.block_counts = [num_transfer_tokens(size, steps)
                             for size, steps in zip(self.block_sizes, split_steps(params.effective_steps,
                                                                                   self.block_sizes))]
        # The sampler compares in float32, where a threshold under its smallest
        # positive value would read as 0 (top-k mode with k = 0: no commit ever).
        self.threshold = max(params.threshold, FLOAT32_TINY) if params.threshold else 0.0
        # What the sampling kernel is asked for: the confidence, whether it is
        # taken at the temperature (Dream) and Dream's alg_temp.
        alg = params.effective_alg
        self.confidence = alg.confidence if self.whole_canvas else params.remasking
        self.tempered = self.whole_canvas
        self.alg_temp = (params.alg_temp or 0.0) if self.whole_canvas else 0.0
        if self.whole_canvas and not self.threshold:
            steps = params.steps or params.max_tokens
            self.dream_ratios = dream_transfer_ratios(steps, params.eps or DEFAULT_EPS)
            # origin: each cell is committed with probability 1 - s/t, drawn here.
            self.origin_rng = np.random.default_rng(seed) if alg == DreamAlg.ORIGIN else None

        self.generated = np.full(self.gen_len, mask_id, dtype=np.int64)  # host mirror
        self.block = 0
        self.block_step = 0  # steps taken in the current block
        self.num_steps = 0
        self.emitted = 0  # generation tokens already reported
        self.slot = -1  # canvas row while running
        self.pages: list[int] = []  # its KV pages while running (cached modes), canvas order
        self.last_step = -1  # the scheduler's step count when it last stepped
        # Cached modes: the next step of this request recomputes the whole canvas
        # (the first step of a block).
        self.needs_full_forward = True
        self.finish_reason: str | None = None
        self._planned = 0  # Dream's schedule: tokens to commit at the next step
        if self.whole_canvas and not self.threshold:
            self._plan_dream_step()

    # ---- the current block, in canvas positions ---------------------------
    @property
    def block_start(self) -> int:
        return self.prompt_len + self.block_starts[self.block]

    @property
    def block_end(self) -> int:
        return self.block_start + self.block_sizes[self.block]

    def masked_positions(self) -> np.ndarray:
        """Canvas positions still masked in the current block (the candidates)."""
        return np.flatnonzero(self._block_cells() == self.mask_id) + self.block_start

    def commit_count(self) -> int:
        """Top-k mode: tokens to commit at this step of the block; 0 in
        threshold mode (the threshold decides, and a block may take more
        steps than `steps` gave it)."""
        if self.threshold:
            return 0
        if self.whole_canvas:
            return self._planned
        return self.block_counts[self.block][self.block_step]

    def _plan_dream_step(self, masked: int | None = None) -> None:
        """Move `block_step` to the next step of Dream's schedule that commits
        something (one that commits nothing changes nothing: no forward is
        spent on it) and plan its count, for `masked` cells left (default:
        those masked now)."""
        if masked is None:
            masked = int((self.generated == self.mask_id).sum())
        last = len(self.dream_ratios) - 1
        while masked:
            step = min(self.block_step, last)
            if step == last:
                count = masked
            elif self.origin_rng is not None:
                count = int(self.origin_rng.binomial(masked, float(self.dream_ratios[step])))
            else:
                count = dream_commit_count(masked, self.dream_ratios[step])
            if count:
                self.block_step, self._planned = step, count
                return
            self.block_step += 1

    # ---- prefix caching: only block-causal attention (LLaDA2) has K/V that
    # the tokens before it alone decide, so only its requests share pages ----
    def prompt_page_keys(self, page_size: int) -> list[bytes]:
        """Keys of the pages of the prompt whose K/V another request may have cached."""
        return []

    def reuse_prefix(self, pages: int, page_size: int) -> None:
        """Its first `pages` pages came from the prefix cache, K/V included."""
        assert pages == 0, "a bidirectional request shares no pages"

    # ---- the step after the one in flight --------------------------------
    def predict_next_step(self) -> Request | None:
        """This request as its next step will find it, if the step in flight
        goes as its schedule says: in top-k mode the block ends exactly when
        its count takes the last masked cells; a threshold step takes at least
        one, and is taken to leave the block going while more are masked;
        Dream's whole-canvas step takes exactly its planned count, so the
        next count is planned from the cells that leaves (`origin` draws it
        from a copy of its generator, which the request then draws the same
        from). None when the last block surely ends.

        What it cannot know is which cells the step in flight commits, so its
        candidates in the same block are the cells masked now: a superset of
        the next step's. The commit kernel only takes cells still masked on the
        device and each candidate's draw depends on its own position alone, so
        the extra candidates change no token; `apply_step` counts only new commits."""
        planned = self.whole_canvas and not self.threshold
        masked = int((self._block_cells() == self.mask_id).sum())
        ends = masked <= (1 if self.threshold else self.commit_count())
        if ends and self.block + 1 == len(self.block_starts):
            return None
        ahead = copy.copy(self)  # shares `generated`: read before this step's result lands
        ahead.num_steps += 1
        if ends:  # the next block's first step, over the whole canvas
            ahead.block, ahead.block_step, ahead.needs_full_forward = self.block + 1, 0, True
        else:
            ahead.block_step, ahead.needs_full_forward = self.block_step + 1, False
            if planned:
                if self.origin_rng is not None:
                    ahead.origin_rng = copy.deepcopy(self.origin_rng)
                ahead._plan_dream_step(masked - self._planned)
        return ahead

    def _block_cells(self) -> np.ndarray:
        g0 = self.block_starts[self.block]
        return self.generated[g0:g0 + self.block_sizes[self.block]]

    # ---- after a step ------------------------------------------------------
    def apply_step(self, positions: np.ndarray, values: np.ndarray) -> tuple[list[int], int]:
        """Record the canvas values read back at this step's candidate positions
        (a superset of the cells masked before it, for a step prepared ahead);
        -> (newly final tokens to report, tokens committed at this step).
        Sets finish_reason when the generation is over."""
        before = self.generated[positions - self.prompt_len]
        committed = (values != self.mask_id) & (before == self.mask_id)
        self.needs_full_forward = False
        self.generated[positions[committed] - self.prompt_len] = values[committed]
        self.num_steps += 1
        self.block_step += 1
        if not (self._block_cells() == self.mask_id).any():
            self.block += 1
            self.block_step = 0
            self.needs_full_forward = True
        elif self.whole_canvas and not self.threshold:
            self._plan_dream_step()
        return self._emit(), int(committed.sum())

    def _emit(self, final_end: int | None = None) -> list[int]:
        """The newly final answer tokens: the committed prefix of the answer
        (up to `final_end` where cells before it may still change otherwise).
        Stops at a stop id; sets finish_reason."""
        start = end = self.emitted
        limit = self.gen_len if final_end is None else min(final_end, self.gen_len)
        while end < limit and self.generated[end] != self.mask_id:
            end += 1
        new = self.generated[start:end].tolist()
        for i, token in enumerate(new):
            if token in self.stop_ids:
                self.emitted = start + i
                self.finish_reason = "stop"
                return new[:i]
        self.emitted = end
        if end == self.gen_len:
            self.finish_reason = "length"
        return new

    def output(self, new_token_ids: list[int], finish_reason: str | None = None,
               error: str | None = None) -> RequestOutput:
        return RequestOutput(self.request_id, new_token_ids, finish_reason or self.finish_reason,
                             self.prompt_len, self.emitted, self.num_steps, error)
