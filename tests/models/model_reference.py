"""An independent float64 re-implementation of the LLaDA/Dream forward,
written from MODEL_FORMATS.md and reading tensors by their checkpoint names,
not through our modules. (A uniquely named module, not conftest.py, so that
`import` finds it whatever other test folders hold.)"""

import glob
import math
import os

import torch
from safetensors.torch import load_file


def read_checkpoint(directory) -> dict:
    tensors = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        tensors |= {k: v.double() for k, v in load_file(f).items()}
    return tensors


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x, pos, theta):
    """Rotate each pair (x[j], x[j + D/2]) by pos * theta^(-2j/D); x [D]."""
    d = x.shape[-1]
    out = x.clone()
    for j in range(d // 2):
        a = pos * theta ** (-2 * j / d)
        out[j] = x[j] * math.cos(a) - x[j + d // 2] * math.sin(a)
        out[j + d // 2] = x[j + d // 2] * math.cos(a) + x[j] * math.sin(a)
    return out


def reference_hidden(w: dict, names: dict, n_layers, n_heads, n_kv_heads, theta, eps, ids, positions):
    """Hidden states [T, D] (before the final norm) of one sequence, position
    by position. `names(i)` gives the checkpoint names of layer i."""
    x = torch.stack([w[names["embed"]][t] for t in ids])  # [T, D]
    T, D = x.shape
    hd = D // n_heads
    for i in range(n_layers):
        n = names["layer"](i)
        h = _rms(x, w[n["attn_norm"]], eps)

        def proj(key):
            y = h @ w[n[key]].T
            return y + w[n[key + "_bias"]] if n.get(key + "_bias") in w else y
        q, k, v = proj("q"), proj("k"), proj("v")
        att = torch.zeros(T, D, dtype=torch.float64)
        for head in range(n_heads):
            kv_head = head // (n_heads // n_kv_heads)
            qs = [_rotate(q[t, head * hd:(head + 1) * hd], positions[t], theta) for t in range(T)]
            ks = [_rotate(k[s, kv_head * hd:(kv_head + 1) * hd], positions[s], theta) for s in range(T)]
            for t in range(T):
                scores = torch.stack([qs[t] @ ks[s] for s in range(T)]) / math.sqrt(hd)
                p = torch.softmax(scores, 0)
                att[t, head * hd:(head + 1) * hd] = sum(p[s] * v[s, kv_head * hd:(kv_head + 1) * hd]
                                                         for s in range(T))
        x = x + att @ w[n["o"]].T
        m = _rms(x, w[n["ff_norm"]], eps)
        gate, up = m @ w[n["gate"]].T, m @ w[n["up"]].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[n["down"]].T
    return x


LLADA_NAMES = {
    "embed": "model.transformer.wte.weight",
    "norm": "model.transformer.ln_f.weight",
    "head": "model.transformer.ff_out.weight",
    "layer": lambda i: {k: f"model.transformer.blocks.{i}.{v}.weight" for k, v in {
        "attn_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
        "ff_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}.items()},
}

DREAM_NAMES = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "head": "lm_head.weight",
    "layer": lambda i: {k: f"model.layers.{i}.{v}" for k, v in {
        "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
        "q_bias": "self_attn.q_proj.bias", "k": "self_attn.k_proj.weight",
        "k_bias": "self_attn.k_proj.bias", "v": "self_attn.v_proj.weight",
        "v_bias": "self_attn.v_proj.bias", "o": "self_attn.o_proj.weight",
        "ff_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}.items()},
}


def reference_logits(w, names, hidden, eps):
    return _rms(hidden, w[names["norm"]], eps) @ w[names["head"]].T


def key_padding_mask(lengths, T, *, left=False):
    """[B, 1, T, T] bool: every query may attend to the real keys of its row."""
    idx = torch.arange(T)
    real = torch.stack([(idx >= T - n) if left else (idx < n) for n in lengths])  # [B, T]
    return real[:, None, None, :].expand(len(lengths), 1, T, T)
