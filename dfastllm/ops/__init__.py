"""Fused sampling and commit kernels (`dfastllm._C`) behind thin typed wrappers.

Interim: until the extension build lands, the public names are bound to the
plain-torch references so the engine can be written against the final
signatures. The next commit replaces this with the extension wrappers (and an
ImportError naming the rebuild command when the extension is missing).
"""

from dfastllm.ops.reference import (
    CONFIDENCE_MODES,
    commit_tokens_reference,
    sample_tokens_reference,
)

sample_tokens = sample_tokens_reference
commit_tokens = commit_tokens_reference

__all__ = [
    "CONFIDENCE_MODES",
    "commit_tokens",
    "commit_tokens_reference",
    "sample_tokens",
    "sample_tokens_reference",
]
