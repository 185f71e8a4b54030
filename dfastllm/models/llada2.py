"""LLaDA2 (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-*): a mixture-of-experts
transformer trained for block diffusion.

Follows the published `modeling_llada2_moe.py` (`model_type` "llada2_moe"):
* attention: one fused `query_key_value` projection (q heads, then k, then
  v; GQA), optional per-head RMSNorm of q and k (`use_qk_norm`), half-split
  RoPE on the first `partial_rotary_factor * head_dim` dims only, its
  frequencies computed over those dims, cos/sin in fp32 cast to the model
  dtype (the rotation runs in the model dtype, as Qwen2/Dream);
* MLP: dense SwiGLU in the first `first_k_dense_replace` layers, then the
  sparse MoE of `moe.py` (fp32 sigmoid router, group-limited top-k, shared
  experts);
* RMSNorm in fp32 with the weight applied after casting back; untied head;
  logits not shifted (position i predicts position i).

Attention is block-causal in generation (a query in block b sees the keys of
blocks 0..b). Blocks are a decoding choice (the request's block_length), so
the model attends as it is told: the engine's ragged batch gives a row
whose queries are one block the keys up to that block's end (`forward_packed`
with a `RaggedAttention`; see engine/llada2_decoding.py), and the dense
`forward` takes a mask, `block_causal_mask` below for one canvas.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dfastllm.models.layers import Block, DiffusionTransformer, HFConfigNames, RMSNorm, SwiGLU
from dfastllm.models.moe import MoE, RouterConfig

# The released tokenizer's ids, which the published generate() hard-codes;
# the loader uses them only when neither config.json nor the tokenizer names them.
DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892


@dataclasses.dataclass
class LLaDA2Config(HFConfigNames):
    # Field names as the checkpoint's config.json spells them.
    hidden_size: int
    intermediate_size: int  # the dense layers' SwiGLU width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    max_position_embeddings: int = 16384
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    use_qkv_bias: bool = False
    use_bias: bool = False  # a bias on the attention output projection
    use_qk_norm: bool = False
    # None: every layer is dense.
    num_experts: int | None = None
    num_experts_per_tok: int = 1
    num_shared_experts: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0

    def __post_init__(self):
        self.check_kv_heads()
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.rope_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} x head_dim {self.head_dim} "
                             "must give an even number of rotated dims in (0, head_dim]")
        if self.num_experts is not None:
            E, G = self.num_experts, self.n_group
            if E % G or E // G < 2:
                raise ValueError(f"num_experts {E} must split into n_group {G} groups of at least 2 "
                                 "(a group is scored by its best two)")
            if not 1 <= self.topk_group <= G:
                raise ValueError(f"topk_group {self.topk_group} must be in [1, n_group={G}]")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * (E // G):
                raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                                 f"[1, {self.topk_group * (E // G)}] (the experts of the kept groups)")

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace

    @property
    def router(self) -> RouterConfig:
        return RouterConfig(self.num_experts, self.num_experts_per_tok, self.n_group, self.topk_group,
                            self.routed_scaling_factor)

    @classmethod
    def from_hf_config(cls, hf: dict) -> LLaDA2Config:
        unsupported = {"tie_word_embeddings": True, "norm_head": True, "use_sliding_window": True}
        for field, bad in unsupported.items():
            if hf.get(field) == bad:
                raise ValueError(f"LLaDA2 config field {field}={bad!r} is not supported")
        for field, value in {"hidden_act": "silu", "score_function": "sigmoid"}.items():
            if hf.get(field, value) != value:
                raise ValueError(f"LLaDA2 config field {field}={hf[field]!r} is not supported (expected {value!r})")
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
            raise ValueError(f"LLaDA2 config field rope_scaling={scaling!r} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        values["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        values["num_shared_experts"] = hf.get("num_shared_experts") or 0
        return cls(**values)


class Attention(nn.Module):
    def __init__(self, c: LLaDA2Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wqkv = nn.Linear(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=c.use_qkv_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.use_qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.use_qk_norm else None
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=c.use_bias)

    def forward(self, x, cos, sin, attention, layer: int):
        """x [N, d_model] packed tokens, cos/sin fp32 [N, rope_dim/2]. QK-norm and
        the partial RoPE are this family's own, so q and k are rotated here and
        `attention.attend_rotated` only writes K/V and attends."""
        N = x.shape[0]
        qkv = self.wqkv(x).view(N, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)  # [N, H|Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]                           # per head, over head_dim
        c, s = (torch.cat([t, t], dim=-1)[:, None].to(q.dtype) for t in (cos, sin))  # [N, 1, rope_dim], for q and k
        q, k = apply_partial_rope(q, c, s), apply_partial_rope(k, c, s)
        y = attention.attend_rotated(layer, q, k, v)                              # [N, H, D]
        return self.wo(y.reshape(N, -1))


class LLaDA2Model(DiffusionTransformer):
    """The shared stack's forward, head and loading with LLaDA2's own layers."""

    logits_shift = 0  # logits of position i come from hidden state i

    def block(self, c: LLaDA2Config, i: int) -> nn.Module:
        mlp = (MoE(c.d_model, c.moe_intermediate_size, c.num_shared_experts, c.router) if c.is_moe_layer(i)
               else SwiGLU(c.d_model, c.intermediate_size))
        return Block(c, Attention(c), mlp)

    @property
    def rope_dims(self) -> int:
        return self.config.rope_dim  # partial RoPE

    def checkpoint_parameters(self) -> dict[str, torch.Tensor]:
        """The shared table, plus each routed expert's tensors as slices
        `name[e]` of the stacked expert parameters (w_gate[e] and w_up[e] the
        row halves of w_gate_up[e]), filled in place, and the routers'
        expert_bias buffers."""
        views = super().checkpoint_parameters()
        for prefix, module in self.named_modules():
            if isinstance(module, MoE):
                gate_up, down = views.pop(f"{prefix}.w_gate_up"), views.pop(f"{prefix}.w_down")
                for e in range(gate_up.shape[0]):
                    gate, up = gate_up[e].chunk(2)
                    views |= {f"{prefix}.w_gate[{e}]": gate, f"{prefix}.w_up[{e}]": up,
                              f"{prefix}.w_down[{e}]": down[e]}
        return views | dict(self.named_buffers())


def apply_partial_rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on the first rope_dim dims of x [N, H, D], with c/s
    [N, 1, rope_dim] (the half-angle tables twice, in x's dtype: the rotation
    runs in the model dtype, as the published code); the rest pass through."""
    half = c.shape[-1] // 2
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x[..., :2 * half] * c + torch.cat([-x2, x1], dim=-1) * s, rest], dim=-1)


def block_causal_mask(length: int, block_length: int, device=None) -> torch.Tensor:
    """[length, length] bool: position q may attend to key s iff s's block
    (counted from position 0) is not after q's."""
    block = torch.arange(length, device=device) // block_length
    return block[None, :] <= block[:, None]


def checkpoint_names(config: LLaDA2Config) -> dict[str, str]:
    """Every checkpoint tensor name of this config, mapped to ours. A routed
    expert's tensor maps to one slice of a stacked parameter, written
    `name[e]` (the loader stacks them)."""
    names = {"model.word_embeddings.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    c = config
    for i in range(c.n_layers):
        ckpt, ours = f"model.layers.{i}.", f"layers.{i}."
        attention = {"query_key_value.weight": "wqkv.weight", "dense.weight": "wo.weight"}
        if c.use_qkv_bias:
            attention["query_key_value.bias"] = "wqkv.bias"
        if c.use_bias:
            attention["dense.bias"] = "wo.bias"
        if c.use_qk_norm:
            attention |= {"query_layernorm.weight": "q_norm.weight", "key_layernorm.weight": "k_norm.weight"}
        names |= {ckpt + "attention." + k: ours + "attn." + v for k, v in attention.items()}
        names |= {ckpt + "input_layernorm.weight": ours + "attn_norm.weight",
                  ckpt + "post_attention_layernorm.weight": ours + "mlp_norm.weight"}
        mlp = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
        if not c.is_moe_layer(i):
            names |= {f"{ckpt}mlp.{k}.weight": f"{ours}mlp.{v}.weight" for k, v in mlp.items()}
            continue
        names |= {ckpt + "mlp.gate.weight": ours + "mlp.router.weight",
                  ckpt + "mlp.gate.expert_bias": ours + "mlp.router.expert_bias"}
        for e in range(c.num_experts):
            names |= {f"{ckpt}mlp.experts.{e}.{k}.weight": f"{ours}mlp.{v}[{e}]" for k, v in mlp.items()}
        if c.num_shared_experts:
            names |= {f"{ckpt}mlp.shared_experts.{k}.weight": f"{ours}mlp.shared.{v}.weight"
                      for k, v in mlp.items()}
    return names
