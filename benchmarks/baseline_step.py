"""A plain-PyTorch cached block step, for comparison only (issue #16): what a
user writing the loop by hand gets. Fused q|k|v and gate|up weights (our
model's own tensors, no second copy), F.rms_norm, no mask, the K/V of the
block written into a dense cache by index_copy_, SDPA over the whole cache,
the head and argmax on the block's rows, all captured in one CUDA graph.

`baseline_step_ms(model, batch_size, context, block_length)` -> median ms of
a replay, which `benchmarks/engine.py --baseline` prints beside the engine's
cached block step.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@torch.inference_mode()
def baseline_step_ms(model, *, batch_size: int, context: int, block_length: int, repeats: int = 20) -> float:
    c = model.config
    device, dtype = model.output.weight.device, model.output.weight.dtype
    H, Hkv, D = c.n_heads, c.n_kv_heads, c.head_dim
    k_cache = [torch.zeros(batch_size, Hkv, context, D, device=device, dtype=dtype) for _ in model.layers]
    v_cache = [torch.zeros_like(k) for k in k_cache]
    start = context - block_length
    ids = torch.randint(0, c.vocab_size, (batch_size, block_length), device=device)
    positions = torch.arange(start, context, device=device)
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    angles = positions[:, None].float() * inv_freq
    cos, sin = (torch.cat([f, f], dim=-1).to(dtype) for f in (angles.cos(), angles.sin()))  # [T, D]
    eps = c.rms_norm_eps

    def step():
        x = model.embed.weight[ids]                                             # [B, T, d]
        for i, layer in enumerate(model.layers):
            h = F.rms_norm(x, (c.d_model,), layer.attn_norm.weight, eps)
            q, k, v = F.linear(h, layer.attn.wqkv.weight).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = _rope(q.view(batch_size, block_length, H, D).transpose(1, 2), cos, sin)
            k = _rope(k.view(batch_size, block_length, Hkv, D).transpose(1, 2), cos, sin)
            k_cache[i].index_copy_(2, positions, k)
            v_cache[i].index_copy_(2, positions, v.view(batch_size, block_length, Hkv, D).transpose(1, 2))
            y = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], enable_gqa=H != Hkv)
            x = x + F.linear(y.transpose(1, 2).reshape(batch_size, block_length, -1), layer.attn.wo.weight)
            h = F.rms_norm(x, (c.d_model,), layer.mlp_norm.weight, eps)
            gate, up = F.linear(h, layer.mlp.w_gate_up.weight).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.mlp.w_down.weight)
        h = F.rms_norm(x, (c.d_model,), model.norm.weight, eps)
        return F.linear(h, model.output.weight).argmax(-1)

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3
