"""Native model families (LLaDA, Dream, LLaDA2) and the checkpoint loader.

Every model has the same interface: `forward_packed(input_ids, position_ids,
attention) -> hidden` over a ragged batch of packed tokens (the engine's;
`attention.py` has its metadata and the paged KV cache), the dense
`forward(input_ids, position_ids, attn_mask=None, kv_cache=None,
cache_positions=None) -> hidden` (training, tests, reference decoding), both
before the final norm, `head(hidden_rows) -> logits`, `logits_shift`, and a
`config` with vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim,
max_seq_len.
"""

from dfastllm.models.kv_cache import KVCache
from dfastllm.models.loader import LoadedModel, load_model

__all__ = ["KVCache", "LoadedModel", "load_model"]
