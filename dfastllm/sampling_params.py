"""Per-request decoding parameters, shared by the HTTP workers, the IPC codec
and the engine. Torch-free on purpose: the HTTP side imports it.

Which published algorithm a request follows depends on the model's family
and on `block_length`:

* LLaDA's block-wise decoding (`generate.py`) for LLaDA, and for Dream when
  the request gives `block_length`: one token per step by default
  (`steps = max_tokens`), blocks of 32, `remasking` low_confidence, greedy.
* Dream's own decoding (`diffusion_generate`) for a Dream checkpoint when
  `block_length` is omitted: the whole answer is one canvas, `steps` in all,
  Dream's schedule (`eps`), confidence rule (`alg`) and selection
  (`alg_temp`); see dfastllm/engine/sampler.py.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class Remasking(enum.IntEnum):
    """Which confidence decides the commit order: the confidence table of
    Python, whose codes the sampling kernel takes (csrc/kernels/params.h has
    the table of C++; importing dfastllm.ops fails if the two disagree).

    LOW_CONFIDENCE and RANDOM are LLaDA's rules; MARGIN and ENTROPY are
    the confidences of Dream's `topk_margin` and `entropy`."""

    LOW_CONFIDENCE = 0
    RANDOM = 1
    MARGIN = 2
    ENTROPY = 3


class DreamAlg(enum.IntEnum):
    """Dream's `alg`, each by the confidence it ranks with. ORIGIN draws
    uniform confidences: its cells are committed at random, each with
    probability 1 - s/t (sampler.py)."""

    MASKGIT_PLUS = Remasking.LOW_CONFIDENCE
    ORIGIN = Remasking.RANDOM
    TOPK_MARGIN = Remasking.MARGIN
    ENTROPY = Remasking.ENTROPY

    @property
    def confidence(self) -> Remasking:
        return Remasking(self.value)


def alg_conflict(alg: DreamAlg | str | None, alg_temp: float | None, threshold: float | None
                 ) -> tuple[str, str] | None:
    """(field, message) when Dream's fields contradict each other (the HTTP
    schema and SamplingParams.validate both ask here)."""
    alg = DreamAlg[alg.upper()] if isinstance(alg, str) else alg
    if alg_temp and alg == DreamAlg.ORIGIN:
        return "alg_temp", "alg_temp ranks cells by confidence; alg origin commits them at random, without one"
    if threshold is not None and alg not in (None, DreamAlg.MASKGIT_PLUS):
        return "alg", "threshold decoding ranks by the token's probability: alg must be maskgit_plus or omitted"
    return None


DEFAULT_BLOCK_LENGTH = 32
DEFAULT_EPS = 1e-3  # Dream's schedule floor (DreamGenerationConfig.eps)
# Families whose own published algorithm decodes the whole answer as one
# canvas when a request omits block_length (the HTTP workers leave
# block_length unset for them; the engine decides by it).
WHOLE_CANVAS_FAMILIES = frozenset({"dream"})
# Families whose default block_length, when a request omits it, is their
# own (Dream: the whole canvas; LLaDA2: its generation_config.json), not
# the server's --default-block-length.
OWN_BLOCK_DEFAULT_FAMILIES = WHOLE_CANVAS_FAMILIES | {"llada2"}
# LLaDA2's own request fields (LLaDA2.1's token editing), and their bound.
LLADA2_FIELDS = ("editing_threshold", "max_post_steps")
MAX_POST_STEPS = 1024


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    # Keep the k most likely tokens (ties with the k-th kept); None keeps all.
    top_k: int | None = None
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
    # Dream's own decoding only (a Dream model, block_length None).
    # alg: None means entropy (Dream's model card), or maskgit_plus with a
    # threshold (the published threshold rule ranks by probability).
    alg: DreamAlg | None = None
    # > 0: the cells to commit are drawn from softmax(confidence / alg_temp)
    # without replacement instead of taking the most confident.
    alg_temp: float | None = None
    eps: float | None = None  # the schedule runs linspace(1, eps, steps + 1); None: DEFAULT_EPS
    # LLaDA2 only (None: the checkpoint's generation_config.json, else the
    # published defaults): editing_threshold turns on LLaDA2.1's token
    # editing; max_post_steps bounds its steps after a block has no mask left.
    editing_threshold: float | None = None
    max_post_steps: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.remasking, str):
            self.remasking = Remasking[self.remasking.upper()]
        if isinstance(self.alg, str):
            self.alg = DreamAlg[self.alg.upper()]
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
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for all tokens), got {self.top_k!r}")
        if self.block_length is not None and not (1 <= self.block_length <= self.max_tokens):
            raise ValueError(f"block_length must be in [1, max_tokens={self.max_tokens}], got {self.block_length!r}")
        if self.steps is not None and not (1 <= self.steps <= self.max_tokens):
            raise ValueError(f"steps must be in [1, max_tokens={self.max_tokens}], got {self.steps!r}")
        if self.threshold is not None and not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed!r}")
        if self.alg_temp is not None and not (0.0 <= self.alg_temp < math.inf):
            raise ValueError(f"alg_temp must be a finite number >= 0, got {self.alg_temp!r}")
        if self.eps is not None and not (0.0 < self.eps < 1.0):
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")
        if self.editing_threshold is not None and not (0.0 <= self.editing_threshold <= 1.0):
            raise ValueError(f"editing_threshold must be in [0, 1], got {self.editing_threshold!r}")
        if self.max_post_steps is not None and not (isinstance(self.max_post_steps, int)
                                                    and 0 <= self.max_post_steps <= MAX_POST_STEPS):
            raise ValueError(f"max_post_steps must be an integer in [0, {MAX_POST_STEPS}], got {self.max_post_steps!r}")
        conflict = alg_conflict(self.alg, self.alg_temp, self.threshold)
        if conflict is not None:
            raise ValueError(conflict[1])

    def decodes_whole_canvas(self, family: str) -> bool:
        """Dream's own algorithm: a Dream model and no block_length."""
        return family in WHOLE_CANVAS_FAMILIES and self.block_length is None

    def family_conflict(self, family: str) -> tuple[str, str] | None:
        """(field, message) when a field does not apply to how a `family` model
        decodes this request; never silently ignored."""
        if family != "llada2":
            for name in LLADA2_FIELDS:
                if getattr(self, name) is not None:
                    return name, f"{name} applies to LLaDA2 models only (this is a {family} model)"
        if self.decodes_whole_canvas(family):
            if self.remasking != Remasking.LOW_CONFIDENCE:
                return "remasking", ("remasking is LLaDA's rule; Dream's own decoding (block_length omitted) "
                                     "takes alg, or give block_length for block-wise decoding")
            return None
        for name in ("alg", "alg_temp", "eps"):
            if getattr(self, name) is not None:
                return name, (f"{name} applies to Dream's own decoding: a Dream model with block_length omitted "
                              f"(this is a {family} model{' with block_length' if self.block_length else ''})")
        return None

    @property
    def effective_alg(self) -> DreamAlg:
        if self.alg is not None:
            return self.alg
        return DreamAlg.MASKGIT_PLUS if self.threshold is not None else DreamAlg.ENTROPY

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
