"""Fused kernels (`dfastllm._C`, C++/CUDA) behind thin typed wrappers, beside
plain-torch references of the same signatures: sampling and commit, and the
transformer layer's residual add + RMSNorm, RoPE + KV-cache write and SiLU-mul.

Importing this package needs the built extension (ImportError with the
rebuild command otherwise) but no GPU; CUDA tensors need a CUDA build.
"""

from dfastllm.ops._extension import BUILT_WITH_CUDA
from dfastllm.ops.add_rms_norm import add_rms_norm
from dfastllm.ops.commit_tokens import commit_tokens
from dfastllm.ops.reference import (
    CONFIDENCE_MODES,
    add_rms_norm_reference,
    commit_tokens_reference,
    rope_write_kv_reference,
    sample_tokens_reference,
    silu_mul_reference,
)
from dfastllm.ops.rope_write_kv import rope_write_kv
from dfastllm.ops.sample_tokens import sample_tokens
from dfastllm.ops.silu_mul import silu_mul

__all__ = [
    "BUILT_WITH_CUDA",
    "CONFIDENCE_MODES",
    "add_rms_norm",
    "add_rms_norm_reference",
    "commit_tokens",
    "commit_tokens_reference",
    "rope_write_kv",
    "rope_write_kv_reference",
    "sample_tokens",
    "sample_tokens_reference",
    "silu_mul",
    "silu_mul_reference",
]
