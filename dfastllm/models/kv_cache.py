"""K/V buffers the models write into and attend over (see `forward(kv_cache=...)`).

Allocated once by the engine (an explicit setup call, not model config);
the models only scatter new K/V at `cache_positions` and read the view."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class KVCache:
    k: list[torch.Tensor]  # one [B, Hkv, S, D] tensor (or view) per layer
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, config, batch_size: int, seq_len: int, *, dtype: torch.dtype,
                 device) -> KVCache:
        shape = (batch_size, config.n_kv_heads, seq_len, config.head_dim)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)])

