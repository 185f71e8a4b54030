"""Per-request decoding parameters, shared by the HTTP workers, the IPC codec
and the engine. Torch-free on purpose: the HTTP side imports it.

Defaults follow the LLaDA reference (`generate.py`): one token per step
(`steps = max_tokens`), blocks of 32, `low_confidence` remasking, greedy.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class Remasking(enum.IntEnum):
    """Which confidence decides the commit order (the kernel's `confidence=`).

    LOW_CONFIDENCE and RANDOM are LLaDA's rules; MARGIN and ENTROPY are
    Dream's `topk_margin` and `entropy` (Dream's `maskgit_plus` is
    LOW_CONFIDENCE)."""

    LOW_CONFIDENCE = 0
    RANDOM = 1
    MARGIN = 2
    ENTROPY = 3

    @property
    def kernel_name(self) -> str:
        return self.name.lower()


DEFAULT_BLOCK_LENGTH = 32


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    # Denoising steps for the whole generation; None means one token per step.
    steps: int | None = None
    # Semi-autoregressive block size; None means DEFAULT_BLOCK_LENGTH,
    # clipped to max_tokens.
    block_length: int | None = None
    remasking: Remasking = Remasking.LOW_CONFIDENCE
    # Parallel decoding (Fast-dLLM): commit every masked position of the
    # block whose confidence reaches this, at least one per step.
    threshold: float | None = None
    seed: int | None = None
    # Extra ids that end the generation like EOS (the engine adds the
    # model's EOS and end-of-turn ids unless ignore_eos).
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.remasking, str):
            self.remasking = Remasking[self.remasking.upper()]
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field; the HTTP layer checks the same
        bounds earlier (pydantic), this guards the offline API and the engine."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.block_length is not None and not (1 <= self.block_length <= self.max_tokens):
            raise ValueError(f"block_length must be in [1, max_tokens={self.max_tokens}], got {self.block_length!r}")
        if self.steps is not None and not (1 <= self.steps <= self.max_tokens):
            raise ValueError(f"steps must be in [1, max_tokens={self.max_tokens}], got {self.steps!r}")
        if self.threshold is not None and not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed!r}")

    @property
    def effective_block_length(self) -> int:
        return min(self.block_length or DEFAULT_BLOCK_LENGTH, self.max_tokens)

    @property
    def num_blocks(self) -> int:
        return -(-self.max_tokens // self.effective_block_length)

    @property
    def effective_steps(self) -> int:
        """Total steps, at least one per block."""
        return max(self.steps or self.max_tokens, self.num_blocks)
