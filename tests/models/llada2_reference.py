"""A plain-torch reference of the published LLaDA2 code (`modeling_llada2_moe.py`:
the forward, LLaDA2.0's `generate` and LLaDA2.1's editing `generate`),
written from that code and reading tensors by their checkpoint names, never
through our modules. It computes in float64 and keeps the published
structure (eager attention with an additive mask, repeat_kv, the
`LLaDA2MoeGate` routing, `moe_infer`'s loop over experts, the generate
loops over blocks and steps), so it is slow and only for tiny checkpoints.

Where the published code depends on the installed transformers (how a 4-D
attention mask is turned into a bias), this reference uses the intended
block-causal mask: 0 where a query may attend, -inf elsewhere.

One rule is added to the published generate, as the engine has it: the mask
token is never proposed (the argmax skips it; its probability still counts
in the confidence). A trained model gives it ~0 probability, so this is the
published behaviour on real checkpoints; on random tiny ones the published
code can "commit" a mask, which leaves the cell masked.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from model_reference import read_checkpoint


class ReferenceLLaDA2:
    def __init__(self, directory):
        with open(os.path.join(directory, "config.json")) as f:
            self.c = json.load(f)
        self.w = read_checkpoint(directory)  # float64
        self.edits = 0  # cells rewritten by token editing (generate_editing), so tests can see it ran
        self.forwards = 0

    # ---- forward --------------------------------------------------------
    def logits(self, ids: list[int], allowed: torch.Tensor) -> torch.Tensor:
        """ids [T]; allowed [T, T] bool (query t may see key s) -> logits [T, V]."""
        c, w = self.c, self.w
        H, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        eps = c["rms_norm_eps"]
        bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
        x = w["model.word_embeddings.weight"][torch.tensor(ids)]               # [T, hidden]
        T = x.shape[0]
        rope_dim = int(D * c["partial_rotary_factor"])
        inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # [T, rope_dim]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = _rms(x, w[p + "input_layernorm.weight"], eps)
            qkv = (h @ w[p + "attention.query_key_value.weight"].T).view(T, H + 2 * Hkv, D)
            q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
            if c.get("use_qk_norm"):
                q = _rms(q, w[p + "attention.query_layernorm.weight"], eps)
                k = _rms(k, w[p + "attention.key_layernorm.weight"], eps)
            q, k = _partial_rope(q, cos, sin), _partial_rope(k, cos, sin)
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # repeat_kv
            scores = torch.einsum("thd,shd->hts", q, k) * D ** -0.5 + bias
            att = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, H * D)
            x = x + att @ w[p + "attention.dense.weight"].T
            m = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            moe = c.get("num_experts") is not None and i >= c["first_k_dense_replace"]
            x = x + (self._moe(p + "mlp.", m) if moe else self._mlp(p + "mlp.", m))
        return _rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T

    def _mlp(self, prefix, x):
        w = self.w
        gate, up = x @ w[prefix + "gate_proj.weight"].T, x @ w[prefix + "up_proj.weight"].T
        return (F.silu(gate) * up) @ w[prefix + "down_proj.weight"].T

    def gate(self, prefix, x):
        """LLaDA2MoeGate: -> (topk_idx [N, K], topk_weight [N, K])."""
        c, w = self.c, self.w
        n, G, K = x.shape[0], c["n_group"], c["num_experts_per_tok"]
        scores = torch.sigmoid(x @ w[prefix + "gate.weight"].T)
        for_routing = scores + w[prefix + "gate.expert_bias"]
        group_scores = for_routing.view(n, G, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=c["topk_group"], dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, G, c["num_experts"] // G).reshape(n, -1)
        masked = for_routing.masked_fill(~score_mask.bool(), float("-inf"))
        topk_idx = torch.topk(masked, k=K, dim=-1)[1]
        weight = torch.gather(scores, 1, topk_idx)
        if K > 1:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, weight * c["routed_scaling_factor"]

    def _moe(self, prefix, x):
        """LLaDA2MoeSparseMoeBlock in eval: the gate, moe_infer's loop, the shared experts."""
        topk_idx, topk_weight = self.gate(prefix, x)
        out = torch.zeros(topk_idx.numel(), x.shape[1], dtype=x.dtype)
        flat = topk_idx.view(-1)
        for e in range(self.c["num_experts"]):
            pairs = (flat == e).nonzero().squeeze(1)
            if pairs.numel():
                out[pairs] = self._mlp(f"{prefix}experts.{e}.", x[pairs // topk_idx.shape[1]])
        y = (out.view(*topk_idx.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        if self.c.get("num_shared_experts"):
            y = y + self._mlp(prefix + "shared_experts.", x)
        return y

    # ---- generation ----------------------------------------------------
    def _window_logits(self, x: list[int], window_end: int, block_length: int) -> torch.Tensor:
        blocks = torch.arange(window_end) // block_length
        self.forwards += 1
        return self.logits(x[:window_end], blocks[None, :] <= blocks[:, None])

    def generate(self, prompt: list[int], *, gen_length: int, block_length: int, steps: int,
                 threshold: float, mask_id: int, eos_id: int, minimal_topk: int = 1,
                 eos_early_stop: bool = False) -> list[int]:
        """LLaDA2.0's generate at temperature 0 -> the answer, cut after its first EOS."""
        steps = min(steps, gen_length // minimal_topk)
        P = len(prompt)
        num_blocks = (P + gen_length + block_length - 1) // block_length
        x = prompt + [mask_id] * (num_blocks * block_length - P)
        schedule = _num_transfer_tokens(block_length, steps)
        for b in range(P // block_length, num_blocks):
            lo, hi = b * block_length, (b + 1) * block_length
            for step in range(steps):
                active = torch.tensor([t == mask_id for t in x[lo:hi]])
                if not active.any():
                    break
                x0, x0_p = _greedy(self._window_logits(x, hi, block_length)[lo:hi], mask_id)
                confidence = torch.where(active, x0_p, float("-inf"))
                high = confidence > threshold
                k = int(schedule[step])
                if int(high.sum()) >= k:
                    transfer = high
                else:
                    transfer = torch.zeros(block_length, dtype=torch.bool)
                    transfer[torch.topk(confidence, k=min(k, int(active.sum()))).indices] = True
                for j in transfer.nonzero().squeeze(1).tolist():
                    x[lo + j] = int(x0[j])
                if eos_early_stop and any(x[lo + j] == eos_id for j in transfer.nonzero().squeeze(1).tolist()):
                    eos_pos = P + x[P:].index(eos_id)  # (the published code searches the prompt too)
                    if all(t != mask_id for t in x[P:eos_pos]):
                        return _cut_after_eos(x[P:eos_pos + 1], eos_id)
            if eos_id in x[P:hi]:
                break
        return _cut_after_eos(x[P:P + gen_length], eos_id)

    def generate_editing(self, prompt: list[int], *, gen_length: int, block_length: int, threshold: float,
                         editing_threshold: float, max_post_steps: int, mask_id: int, eos_id: int,
                         num_to_transfer: int = 1, eos_early_stop: bool = False) -> list[int]:
        """LLaDA2.1's generate (mask-to-token plus token-to-token editing) at temperature 0."""
        P = len(prompt)
        num_blocks = (P + gen_length + block_length - 1) // block_length
        x = prompt + [mask_id] * (num_blocks * block_length - P)
        for b in range(P // block_length, num_blocks):
            lo, hi = b * block_length, (b + 1) * block_length
            in_prompt = torch.arange(lo, hi) < P
            post_steps = 0
            while True:
                old = torch.tensor(x[lo:hi])
                active = old == mask_id
                if not active.any():
                    post_steps += 1
                if post_steps > max_post_steps:
                    break
                x0, x0_p = _greedy(self._window_logits(x, hi, block_length)[lo:hi], mask_id)
                mask_transfer = torch.zeros(block_length, dtype=torch.bool)
                if active.any():
                    confidence = torch.where(active, x0_p, float("-inf"))
                    high = (confidence > threshold) & active
                    if int(high.sum()) >= num_to_transfer:
                        mask_transfer = high
                    else:
                        mask_transfer[torch.topk(confidence, k=min(num_to_transfer, int(active.sum()))).indices] = True
                editable = ~active & ~in_prompt
                editing = torch.where(editable, x0_p, float("-inf"))
                edit_transfer = (editing > editing_threshold) & editable & (x0 != old)
                self.edits += int(edit_transfer.sum())
                for j in (mask_transfer | edit_transfer).nonzero().squeeze(1).tolist():
                    x[lo + j] = int(x0[j])
                if not active.any() and not edit_transfer.any():
                    break
            if eos_early_stop and mask_id not in x[P:hi] and eos_id in x[P:hi]:
                break
        return _cut_after_eos(x[P:P + gen_length], eos_id)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _partial_rope(x, cos, sin):
    """x [T, heads, D]: rotate_half RoPE on the first cos.shape[-1] dims."""
    r = cos.shape[-1]
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = xr[..., :r // 2], xr[..., r // 2:]
    rotated = xr * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]
    return torch.cat([rotated, rest], -1)


def _num_transfer_tokens(block_length, steps):
    base, remainder = divmod(block_length, steps)
    return [base + (i < remainder) for i in range(steps)]


def _greedy(logits, mask_id):
    """_sample_with_temperature_topk_topp at temperature 0: argmax (never the
    mask token, see above) and its softmax probability."""
    probs = logits.softmax(-1)
    token = logits.index_fill(-1, torch.tensor([mask_id]), float("-inf")).argmax(-1)
    return token, probs.gather(-1, token[:, None]).squeeze(1)


def _cut_after_eos(tokens, eos_id):
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


# The published sampling filters (temperature, then these, in this order).
def top_k_logits(logits, k):
    if k is None or k <= 0:
        return logits
    min_values = torch.topk(logits, k)[0][..., -1, None]
    return torch.where(logits < min_values, torch.full_like(logits, float("-inf")), logits)


def top_p_logits(logits, p):
    if p is None or p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_mask = cumulative > p
    sorted_mask[..., 1:] = sorted_mask[..., :-1].clone()
    sorted_mask[..., 0] = False
    mask = torch.scatter(torch.full_like(logits, False, dtype=torch.bool), -1, sorted_indices, sorted_mask)
    return logits.masked_fill(mask, float("-inf"))
