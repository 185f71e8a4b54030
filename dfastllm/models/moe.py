"""The sparse mixture-of-experts MLP of LLaDA2 (inclusionAI/LLaDA2.x-mini,
-flash): an fp32 sigmoid router with group-limited top-k, routed SwiGLU
experts and a shared SwiGLU.

The experts' weights are stacked ([experts, out, in], loaded from the
checkpoint's per-expert tensors; gate and up in one [experts, 2 * inner, in]
matrix, as the dense SwiGLU fuses them), so a step multiplies every routed
(token, expert) pair in two grouped GEMMs (`torch._grouped_mm`: the pairs
sorted by expert, one group per expert) with `silu_mul` between them, no
Python loop over experts and no host synchronisation.
`per_expert_reference` is the plain loop the published `moe_infer` runs,
kept for the parity test and the benchmark.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from dfastllm import ops
from dfastllm.models.layers import SwiGLU, plain_torch
from dfastllm.ops.reference import silu_mul_reference


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    top_k: int  # num_experts_per_tok
    n_group: int
    topk_group: int
    routed_scaling_factor: float


def route(hidden: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor,
          c: RouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, D] -> (experts [N, K] long, weights [N, K] fp32), as the
    published `LLaDA2MoeGate` computes them:

    * logits = hidden @ gate_weight.T, both in fp32; scores = sigmoid(logits);
    * selection ranks scores + expert_bias (the bias steers the choice only):
      each of n_group groups is scored by the sum of its best two, the
      topk_group best groups stay, and the top_k experts of those are taken;
    * weights are the chosen experts' unbiased scores, divided by their sum
      (+1e-20) when top_k > 1, times routed_scaling_factor.

    The experts come in torch.topk's order, the order the weighted sum runs in."""
    n_tokens = hidden.shape[0]
    scores = F.linear(hidden.float(), gate_weight.float()).sigmoid()              # [N, E]
    biased = scores + expert_bias.float()
    group_scores = biased.view(n_tokens, c.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [N, G]
    groups = group_scores.topk(c.topk_group, dim=-1, sorted=False).indices        # [N, topk_group]
    group_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    expert_kept = group_kept.repeat_interleave(c.num_experts // c.n_group, dim=1)  # [N, E]
    experts = biased.masked_fill(~expert_kept, float("-inf")).topk(c.top_k, dim=-1).indices  # [N, K]
    weights = scores.gather(1, experts)
    if c.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return experts, weights * c.routed_scaling_factor


class Router(nn.Module):
    def __init__(self, d_model: int, c: RouterConfig):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.num_experts, d_model))
        # Not learned: a load-balancing offset the training updated by hand.
        self.register_buffer("expert_bias", torch.zeros(c.num_experts))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(hidden, self.weight, self.expert_bias, self.c)


class MoE(nn.Module):
    """Routed experts (stacked weights) plus the shared experts' MLP."""

    def __init__(self, d_model: int, expert_hidden: int, n_shared: int, c: RouterConfig):
        super().__init__()
        E = c.num_experts
        self.router = Router(d_model, c)
        # gate|up [E, 2I, D] (rows as nn.Linear); the checkpoint's w_gate[e] and
        # w_up[e] load into its row halves (LLaDA2Model.checkpoint_parameters).
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * expert_hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(E, d_model, expert_hidden))  # [E, D, I]
        # The published block builds the shared MLP as one SwiGLU n_shared experts wide.
        self.shared = SwiGLU(d_model, expert_hidden * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                           # [N, D]
        experts, weights = self.router(flat)
        y = grouped_experts(flat, experts, weights, self.w_gate_up, self.w_down,
                            plain_torch=plain_torch(x, self.w_gate_up))
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(shape)


def grouped_experts(x, experts, weights, w_gate_up, w_down, *, plain_torch: bool = False) -> torch.Tensor:
    """sum_k weights[n, k] * expert_{experts[n, k]}(x[n]) for every token n.

    x [N, D]; experts, weights [N, K]; w_gate_up [E, 2I, D] (gate rows, then
    up); w_down [E, D, I]; plain_torch: silu_mul's reference, not the kernel.
    The N*K (token, expert) pairs are sorted by expert (stable, so a token's
    pairs keep their order within an expert), each projection is one grouped
    GEMM over the sorted rows with group boundaries at the cumulative expert
    counts, and the outputs are scattered back and summed in fp32 over k in
    the router's order, then cast to x's dtype, as the published `moe_infer`."""
    N, K = experts.shape
    E = w_gate_up.shape[0]
    pair_expert = experts.reshape(-1)                                            # [N*K]
    order = pair_expert.argsort(stable=True)
    # Group ends [E] by a sorted search, not bincount: on CUDA bincount reads
    # its input's max back to the host (a sync every layer, and no CUDA graph).
    ends = torch.searchsorted(pair_expert[order], torch.arange(E, device=x.device), right=True).to(torch.int32)
    rows = x.index_select(0, order // K)                                         # [N*K, D], by expert
    silu_mul = silu_mul_reference if plain_torch else ops.silu_mul
    h = silu_mul(_grouped_mm(rows, w_gate_up.transpose(1, 2), ends))           # [N*K, I]
    out_sorted = _grouped_mm(h, w_down.transpose(1, 2), ends)                    # [N*K, D]
    out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)         # back to (token, k) order
    return (out.view(N, K, x.shape[1]).float() * weights[..., None]).sum(1).to(x.dtype)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows a[ends[e-1]:ends[e]] @ b[e] for each group e: a [M, K], b [E, K, N] -> [M, N]."""
    if a.shape[0] == 0:  # no token this step: nothing to multiply
        return a.new_empty(0, b.shape[-1])
    return torch._grouped_mm(a, b, offs=ends)


def per_expert_reference(x, experts, weights, w_gate, w_up, w_down) -> torch.Tensor:
    """The published `moe_infer`: a Python loop over the experts that got
    tokens, one small matmul chain each. Same result as `grouped_experts`
    (the parity test) and the baseline of benchmarks/moe.py."""
    N, K = experts.shape
    out = torch.zeros(N * K, x.shape[1], dtype=x.dtype, device=x.device)
    pair_expert = experts.reshape(-1)
    for e in pair_expert.unique().tolist():
        pairs = (pair_expert == e).nonzero().squeeze(1)
        rows = x[pairs // K]
        out[pairs] = F.linear(F.silu(F.linear(rows, w_gate[e])) * F.linear(rows, w_up[e]), w_down[e])
    return (out.view(N, K, x.shape[1]).float() * weights[..., None]).sum(1).to(x.dtype)
