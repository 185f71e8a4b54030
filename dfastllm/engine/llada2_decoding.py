"""LLaDA2's decoding rules on the engine's step: the published `generate` of
LLaDA2.0 (threshold rule) and of LLaDA2.1 (plus token editing).

What differs from LLaDA 1.x (`request.py`, `sampler.py`):

* Blocks are counted from canvas position 0, not from the end of the prompt,
  and the canvas is rounded up to whole blocks: the first answer block may
  hold the prompt's last tokens, and the cells past max_tokens in the last
  block are denoised too (they take part in the ranking) but never returned.
* Attention is block-causal (a query in block b sees blocks 0..b). A step's
  queries are split into one attention row per block (`batch.py`, from
  `Request.attention_block`), each seeing the canvas up to its block's end,
  over the paged K/V pool (this family always runs over pages).
* The exact KV cache (kv_cache prefix or dual, the family's default): the
  K/V of a block depends only on blocks 0..b, so once a block's tokens are
  final its K/V is too. A step queries [cached_until, block_end): the
  current block, plus once the block that ended at the previous step (its
  last commit came after that step's forward, so its pages still hold K/V
  of its masks) and at the first step the prompt's blocks. With kv_cache
  none every step recomputes blocks 0..current, as the published generate.
* `steps` counts per block (the published meaning; default block_length):
  step s of a block has the share `num_transfer_tokens(block_length, steps)[s]`.
* Sampling: temperature, then top-k, then top-p (published order, top-p
  keeps the tokens whose preceding mass is <= p); the confidence is the
  sampled token's probability under that distribution; at temperature 0 the
  token is the argmax and its confidence the plain softmax probability.
* Commit (2.0): the masked cells whose confidence is above `threshold`
  if there are at least the step's share of them, else that share by
  confidence (ties to the lower position).
* Editing (2.1, `editing_threshold` set): the share is 1 (num_to_transfer),
  and in the same step every already-committed, non-prompt cell of the block
  whose sample differs from it with confidence above `editing_threshold` is
  rewritten. Once no cell is masked, the block runs post steps until one
  edits nothing or `max_post_steps` of them ran. A block's cells may change
  until it ends, so its text is emitted only then.

As everywhere in the engine the mask token is never proposed (a model that
keeps predicting it would never finish a block); its probability still
counts in the confidence, as in the published code.

Top-k is the shared request field (SamplingParams.top_k, None: off), but
filtered in this family's order (temperature, top-k, top-p), not Dream's.

The commit runs as a few torch ops over the step's candidates, on the
device with no host synchronisation (the fused `commit_tokens` kernel's
threshold mode keeps "at least one", not "at least the step's share").
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib

import numpy as np
import torch

from dfastllm import ops
from dfastllm.engine.batch import upload_arrays
from dfastllm.engine.request import Request
from dfastllm.engine.sampler import num_transfer_tokens
from dfastllm.sampling_params import DEFAULT_BLOCK_LENGTH, SamplingParams

KV_CACHED_MODES = ("prefix", "dual")  # for this family both mean the exact block cache


@dataclasses.dataclass(frozen=True)
class LLaDA2Defaults:
    """What a request that leaves a field unset gets: the published
    generate()'s defaults, overridden by the checkpoint's generation_config.json."""
    block_length: int = DEFAULT_BLOCK_LENGTH
    threshold: float = 0.95
    editing_threshold: float | None = None  # None: the LLaDA2.0 rule (no editing)
    max_post_steps: int = 16

    @classmethod
    def from_generation_config(cls, generation_config: dict) -> LLaDA2Defaults:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in generation_config.items() if k in fields and v is not None})


class LLaDA2Request(Request):
    """A request decoded by the LLaDA2 rules. Canvas positions are absolute;
    `generated` mirrors the canvas from the prompt's end to the last block's end."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                 defaults: LLaDA2Defaults, **kwargs):
        super().__init__(request_id, prompt_ids, params, **kwargs)
        B = params.block_length or defaults.block_length
        self.attention_block = B
        self.threshold = params.threshold if params.threshold is not None else defaults.threshold
        self.editing_threshold = (params.editing_threshold if params.editing_threshold is not None
                                  else defaults.editing_threshold)
        self.max_post_steps = (params.max_post_steps if params.max_post_steps is not None
                               else defaults.max_post_steps)
        n_blocks = -(-(self.prompt_len + self.gen_len) // B)
        self.canvas_len = n_blocks * B
        self.block = self.prompt_len // B  # absolute block index
        steps = min(params.steps or B, self.gen_len)
        # LLaDA2.1 commits at least one masked cell per step (num_to_transfer).
        self.schedule = [1] * B if self.editing else num_transfer_tokens(B, steps)
        self.generated = np.full(self.canvas_len - self.prompt_len, self.mask_id, dtype=np.int64)
        self.post_steps = 0
        # Canvas positions [0, cached_until) have final K/V in the pages (exact cache).
        self.cached_until = 0
        # Prefix caching: the chain of page keys computed so far, and how many
        # of the request's pages are registered in the pool (or came from it).
        self._page_keys: list[bytes] = []
        self._key_state = hashlib.sha256(f"llada2 block {B}".encode())
        self._keyed_until = 0  # canvas positions the chain has hashed
        self.pages_registered = 0

    @property
    def editing(self) -> bool:
        return self.editing_threshold is not None

    @property
    def block_start(self) -> int:
        return self.block * self.attention_block

    @property
    def block_end(self) -> int:
        return self.block_start + self.attention_block

    def query_extent(self, cache_mode: str) -> tuple[int, int]:
        """The canvas positions [start, end) the next step queries."""
        return (self.cached_until if cache_mode in KV_CACHED_MODES else 0), self.block_end

    # ---- prefix caching (kv_cache.py) ---------------------------------------
    # Page j's K/V depends on the tokens up to the end of the block holding
    # its last position (block-causal attention), and on the block length:
    # its key hashes exactly those, chained page after page.
    def _keys_until(self, page_size: int, limit: int) -> list[bytes]:
        """Keys of the pages whose K/V depends only on canvas positions [0, limit)."""
        B = self.attention_block
        tokens = None
        while True:
            j = len(self._page_keys)
            depends_until = -(-(j + 1) * page_size // B) * B
            if depends_until > limit:
                return self._page_keys
            if tokens is None:
                tokens = np.concatenate([np.asarray(self.prompt_ids, dtype=np.int64), self.generated])
            # The page index too: pages of one block depend on the same tokens.
            self._key_state.update(j.to_bytes(8, "little") + tokens[self._keyed_until:depends_until].tobytes())
            self._keyed_until = depends_until
            self._page_keys.append(self._key_state.copy().digest())

    def prompt_page_keys(self, page_size: int) -> list[bytes]:
        """Keys of the pages within the prompt's whole blocks."""
        B = self.attention_block
        return self._keys_until(page_size, self.prompt_len // B * B)

    def reuse_prefix(self, pages: int, page_size: int) -> None:
        self.cached_until = pages * page_size
        self.pages_registered = pages

    def final_pages(self, page_size: int) -> list[tuple[int, bytes]]:
        """(page, key) of the pages whose K/V became final since the last call
        (kv_cache prefix/dual: positions before cached_until are final)."""
        keys = self._keys_until(page_size, self.cached_until)
        new = [(self.pages[j], keys[j]) for j in range(self.pages_registered, len(keys))]
        self.pages_registered = len(keys)
        return new

    def _block_cells(self) -> np.ndarray:
        """The mirror of the current block's non-prompt cells."""
        return self.generated[max(self.block_start - self.prompt_len, 0):self.block_end - self.prompt_len]

    def masked_positions(self) -> np.ndarray:
        """The candidates: the block's masked cells; with editing, every non-prompt cell."""
        first = max(self.block_start, self.prompt_len)
        cells = self._block_cells()
        return np.arange(first, self.block_end) if self.editing else np.flatnonzero(cells == self.mask_id) + first

    def commit_count(self) -> int:
        """The step's share; past the schedule (a model that proposed only the
        mask token) one per step, so the block still ends."""
        return self.schedule[self.block_step] if self.block_step < len(self.schedule) else 1

    def predict_next_step(self) -> LLaDA2Request | None:
        """As `Request.predict_next_step`, by this family's rules: a step
        commits at least its share, so the block surely ends when the share
        covers every masked cell (2.0), and is taken to go on otherwise; with
        editing (2.1) a block whose masks are going goes on into its post
        steps while any are allowed. Either way the next step's forward
        starts at this block's start. None in a post step (whether the block
        ends depends on what the step edits) and when the last block ends."""
        masked = int((self._block_cells() == self.mask_id).sum())
        if self.editing and not masked:
            return None
        ends = masked <= self.commit_count() and (not self.editing or self.max_post_steps < 1)
        if ends and self.block_end >= self.canvas_len:
            return None
        ahead = copy.copy(self)  # shares `generated` and the page-key chain, neither touched by a build
        ahead.num_steps += 1
        ahead.cached_until = self.block_start
        if ends:
            ahead.block, ahead.block_step = self.block + 1, 0
        else:
            ahead.block_step = self.block_step + 1
        ahead.needs_full_forward = ahead.cached_until < ahead.block_start
        return ahead

    def apply_step(self, positions: np.ndarray, values: np.ndarray) -> tuple[list[int], int]:
        cells = self.generated[positions - self.prompt_len]
        had_masks = bool((self._block_cells() == self.mask_id).any())
        committed = int(((cells == self.mask_id) & (values != self.mask_id)).sum())
        edited = bool(((cells != self.mask_id) & (values != cells)).any())
        self.generated[positions - self.prompt_len] = values
        self.num_steps += 1
        self.block_step += 1
        masked_now = bool((self._block_cells() == self.mask_id).any())
        if self.editing and not had_masks:
            self.post_steps += 1
        if not self.editing:
            block_done = not masked_now
        elif had_masks:  # the mask-to-token phase; post steps follow while allowed
            block_done = not masked_now and self.max_post_steps < 1
        else:
            block_done = not edited or self.post_steps + 1 > self.max_post_steps
        # This step's forward saw blocks before the current one at their final tokens.
        self.cached_until = self.block_start
        if block_done:
            self.block += 1
            self.block_step = 0
            self.post_steps = 0
        # A step that also computes finished blocks (the prompt's, or the block
        # just ended) is not the steady one-block shape (no CUDA graph).
        self.needs_full_forward = self.cached_until < self.block_start
        # 2.0: a committed cell never changes; 2.1: only ended blocks are final.
        return self._emit(final_end=self.block_start - self.prompt_len if self.editing else None), committed


@dataclasses.dataclass
class LLaDA2Step:
    """The per-step inputs only LLaDA2 rows need, beside the StepBatch's."""
    commit_k: torch.Tensor  # [canvas rows] long: the step's share (at least this many commit)
    editing_threshold: torch.Tensor  # [canvas rows] float32; +inf where a row does not edit
    top_k: torch.Tensor | None  # [n] long per candidate, 0 = off; None when no request asks for it
    top_p: torch.Tensor | None  # [n] float32 per candidate; None when no request asks for it


def step_inputs(requests: list[LLaDA2Request], counts: list[int], canvas_rows: int, device) -> LLaDA2Step:
    """requests in the StepBatch's order, counts their candidates. One upload
    (pinned, asynchronous on CUDA); the filters a step does not use are
    decided here, on the host, so the step neither sorts for them nor syncs."""
    slots = [r.slot for r in requests]
    commit_k = np.zeros(canvas_rows, dtype=np.float32)
    editing = np.full(canvas_rows, np.inf, dtype=np.float32)
    commit_k[slots] = [r.commit_count() for r in requests]
    editing[slots] = [r.editing_threshold if r.editing else np.inf for r in requests]
    top_k = np.repeat(np.array([r.params.top_k or 0 for r in requests], dtype=np.float32), counts)
    top_p = np.repeat(np.array([r.params.top_p for r in requests], dtype=np.float32), counts)
    commit_k_t, editing_t, top_k_t, top_p_t = upload_arrays([commit_k, editing, top_k, top_p], np.float32, device)
    return LLaDA2Step(commit_k=commit_k_t.long(), editing_threshold=editing_t,
                      top_k=top_k_t.long() if (top_k > 0).any() else None,
                      top_p=top_p_t if (top_p < 1.0).any() else None)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                  top_p: torch.Tensor | None) -> torch.Tensor:
    """The published order on rows with temperature > 0: logits / t, then top-k
    (keep the k largest and ties with the k-th), then top-p (drop a token when
    the mass of the tokens sorted before it exceeds p). Rows at temperature 0
    are left as they are (the published greedy path filters nothing)."""
    sampled = temperature > 0
    scaled = torch.where(sampled[:, None], logits / temperature.clamp_min(1e-30)[:, None], logits)
    if top_k is not None:
        use = sampled & (top_k > 0)
        kth = scaled.sort(dim=-1, descending=True).values.gather(
            1, (top_k.clamp(1, scaled.shape[1]) - 1)[:, None])
        scaled = torch.where(use[:, None] & (scaled < kth), float("-inf"), scaled)
    if top_p is not None:
        use = sampled & (top_p < 1.0)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) > top_p[:, None]
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(use[:, None] & drop, float("-inf"))
    return scaled


def sample_and_commit(head, hidden: torch.Tensor, batch, canvas: torch.Tensor, mask_id: int,
                      extra: LLaDA2Step) -> torch.Tensor:
    """LLaDA2's step after the forward; -> the candidates' cells after it (on
    the device). `batch` is a StepBatch; canvas [canvas rows, L] is updated in place."""
    s = batch.sampling
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.hidden_index)   # [n, D]
    logits = filter_logits(head(rows).float(), s.temperature, extra.top_k, extra.top_p)  # [n, V]
    log_z = logits.logsumexp(-1)  # the mask token's probability still counts in the confidence
    logits[:, mask_id] = float("-inf")  # never proposed; a sampled token is never it, so its logit is unchanged
    tokens, _ = ops.sample_tokens(logits, (s.temperature > 0).float(), seed=s.seed, offset=s.rng_offset)
    confidence = (logits.gather(1, tokens[:, None]).squeeze(1) - log_z).exp()        # [n]
    commit_cells(canvas, batch, tokens, confidence, mask_id, extra)
    return canvas[batch.cand_rows, batch.cand_positions]


def commit_cells(canvas, batch, tokens, confidence, mask_id: int, extra: LLaDA2Step) -> None:
    """Per row: commit masked candidates ranked (confidence descending, then
    position) below max(#above threshold, the step's share); with editing,
    also rewrite committed candidates whose new token differs with confidence
    above the editing threshold."""
    cand_rows, positions = batch.cand_rows, batch.cand_positions
    current = canvas[cand_rows, positions]
    masked = current == mask_id
    ranked_conf = torch.where(masked, confidence, float("-inf"))
    order = ranked_conf.argsort(descending=True, stable=True)           # confidence, then position
    order = order[cand_rows[order].argsort(stable=True)]                 # grouped by canvas row
    offsets = batch.cand_offsets.long()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - offsets[cand_rows[order]]
    above = (ranked_conf > batch.sampling.threshold[cand_rows]).long()
    n_above = torch.zeros(canvas.shape[0], dtype=torch.long, device=canvas.device).index_add_(0, cand_rows, above)
    share = torch.maximum(n_above, extra.commit_k)
    commit = masked & (rank < share[cand_rows])
    edit = ~masked & (confidence > extra.editing_threshold[cand_rows]) & (tokens != current)
    # Every candidate cell is written (its own value where nothing changes):
    # selecting the written ones by a mask would read their count back to the host.
    canvas[cand_rows, positions] = torch.where(commit | edit, tokens, current)
