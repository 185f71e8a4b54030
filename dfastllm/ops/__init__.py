"""Fused sampling and commit kernels (`dfastllm._C`, C++/CUDA) behind thin
typed wrappers, beside plain-torch references of the same signatures.

Importing this package needs the built extension (ImportError with the
rebuild command otherwise) but no GPU; CUDA tensors need a CUDA build.
"""

from dfastllm.ops._extension import BUILT_WITH_CUDA
from dfastllm.ops.commit_tokens import commit_tokens
from dfastllm.ops.reference import (
    CONFIDENCE_MODES,
    commit_tokens_reference,
    sample_tokens_reference,
)
from dfastllm.ops.sample_tokens import sample_tokens

__all__ = [
    "BUILT_WITH_CUDA",
    "CONFIDENCE_MODES",
    "commit_tokens",
    "commit_tokens_reference",
    "sample_tokens",
    "sample_tokens_reference",
]
