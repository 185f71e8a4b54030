"""Tiny checkpoints in the real LLaDA, Dream and LLaDA2 formats, for tests.

They hold what a real checkpoint directory holds: `config.json` with the
checkpoint's own field names, random weights in safetensors (one file or
sharded with `model.safetensors.index.json`) under the checkpoint's tensor
names, and a byte-level BPE tokenizer (`tokenizer.json`,
`tokenizer_config.json` with the family's special tokens and chat template).
Tests load them through `dfastllm.models.load_model`, the same path as the
8B models.

`head_scale` multiplies the output head: random weights give near-uniform
logits; a large head (e.g. 30) gives peaked ones, so a checkpoint is
"confident" and threshold decoding finishes in a few steps.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

LLADA_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|eot_id|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|mdm_mask|>")
DREAM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
LLADA2_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|role_end|>", "<|mask|>")

# LLaDA-8B-Instruct's template: Llama-3 headers, BOS before the first message.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Dream-v0-Instruct's ChatML (Qwen2.5 without tools): a default system turn.
DREAM_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# LLaDA2's (Ling's) roles: <role>NAME</role>content<|role_end|>, user = HUMAN.
LLADA2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = 'HUMAN' if message['role'] == 'user' else message['role'] | upper -%}"
    "{{- '<role>' + role + '</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}"
)

# Enough text for a few hundred BPE merges; the merges only shape how text
# splits, any text still encodes through the byte alphabet.
DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A masked diffusion language model predicts every masked token of the canvas at once, "
    "then commits the most confident ones and repeats until no mask is left.",
    "Hello, world! How are you today? I am fine, thank you. What is the capital of France? "
    "Paris is the capital of France. One, two, three, four, five, six, seven, eight, nine, ten.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n",
    "Once upon a time there was a little model that wanted to write stories. It read many "
    "books and learned the words of the world, the names of the numbers and the colors: "
    "red, green, blue, yellow, black and white.",
    "héllo wörld, ça va? 世界 你好 こんにちは 🙂",
]


def write_tokenizer(directory, family: str, *, vocab_size: int = 320, corpus=None) -> HFTokenizer:
    """Byte-level BPE with exactly `vocab_size` tokens; the family's special
    tokens take ids 0..k-1. Writes tokenizer.json and tokenizer_config.json."""
    special = {"llada": LLADA_SPECIAL_TOKENS, "dream": DREAM_SPECIAL_TOKENS, "llada2": LLADA2_SPECIAL_TOKENS}[family]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus gives {tok.get_vocab_size()} tokens, not vocab_size={vocab_size}; "
                         "pass a larger corpus")
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if family == "llada":
        names = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>"}
        template = LLADA_CHAT_TEMPLATE
    elif family == "llada2":  # the mask token is found by name, as in the released tokenizer_config
        names = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        template = LLADA2_CHAT_TEMPLATE
    else:
        names = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                 "mask_token": "<|mask|>"}
        template = DREAM_CHAT_TEMPLATE
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 4096, "chat_template": template, **names}
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    return tok


def write_tiny_llada(directory, *, seed: int = 0, n_layers: int = 2, d_model: int = 64,
                     n_heads: int = 4, n_kv_heads: int = 4, mlp_hidden_size: int | None = None,
                     vocab: int = 320, max_sequence_length: int = 512, rope_theta: float = 10000.0,
                     head_scale: float = 1.0, shard: bool = False,
                     dtype: torch.dtype = torch.float32) -> str:
    """A LLaDA checkpoint directory with random weights; returns the directory."""
    tok = write_tokenizer(directory, "llada", vocab_size=vocab)
    eos = tok.token_to_id("<|endoftext|>")
    hidden = mlp_hidden_size or 3 * d_model
    config = {
        "model_type": "llada", "architectures": ["LLaDAModelLM"],
        "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
        "mlp_hidden_size": hidden, "mlp_ratio": hidden // d_model,
        "vocab_size": vocab, "embedding_size": vocab, "max_sequence_length": max_sequence_length,
        "rope_theta": rope_theta, "rms_norm_eps": 1e-5,
        "mask_token_id": tok.token_to_id("<|mdm_mask|>"), "eos_token_id": eos, "pad_token_id": eos,
        "weight_tying": False, "block_type": "llama", "activation_type": "silu",
        "layer_norm_type": "rms", "include_bias": False, "include_qkv_bias": False,
        "rope": True, "rope_full_precision": True, "scale_logits": False,
        "attention_layer_norm": False, "input_emb_norm": False,
    }
    kv = n_kv_heads * (d_model // n_heads)
    shapes = {"model.transformer.wte.weight": (vocab, d_model)}
    for i in range(n_layers):
        p = f"model.transformer.blocks.{i}."
        shapes |= {p + "attn_norm.weight": (d_model,), p + "q_proj.weight": (d_model, d_model),
                   p + "k_proj.weight": (kv, d_model), p + "v_proj.weight": (kv, d_model),
                   p + "attn_out.weight": (d_model, d_model), p + "ff_norm.weight": (d_model,),
                   p + "ff_proj.weight": (hidden, d_model), p + "up_proj.weight": (hidden, d_model),
                   p + "ff_out.weight": (d_model, hidden)}
    shapes |= {"model.transformer.ln_f.weight": (d_model,),
               "model.transformer.ff_out.weight": (vocab, d_model)}
    tensors = _random_tensors(shapes, seed, head="model.transformer.ff_out.weight",
                              head_scale=head_scale, dtype=dtype)
    _write_json(os.path.join(directory, "config.json"), config)
    _write_weights(directory, tensors, shard)
    return os.fspath(directory)


def write_tiny_dream(directory, *, seed: int = 0, n_layers: int = 2, d_model: int = 64,
                     n_heads: int = 4, n_kv_heads: int = 2, intermediate_size: int | None = None,
                     vocab: int = 320, max_position_embeddings: int = 512,
                     rope_theta: float = 1e6, head_scale: float = 1.0, shard: bool = False,
                     dtype: torch.dtype = torch.float32) -> str:
    """A Dream checkpoint directory (Qwen2 names, GQA, q/k/v biases); returns the directory."""
    tok = write_tokenizer(directory, "dream", vocab_size=vocab)
    eos = tok.token_to_id("<|endoftext|>")
    hidden = intermediate_size or 3 * d_model
    config = {
        "model_type": "Dream", "architectures": ["DreamModel"],
        "hidden_size": d_model, "intermediate_size": hidden, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings, "rope_theta": rope_theta,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "mask_token_id": tok.token_to_id("<|mask|>"), "eos_token_id": eos, "pad_token_id": eos,
        "bos_token_id": eos, "attention_dropout": 0.0, "torch_dtype": "bfloat16",
    }
    kv = n_kv_heads * (d_model // n_heads)
    shapes = {"model.embed_tokens.weight": (vocab, d_model)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d_model,),
                   p + "self_attn.q_proj.weight": (d_model, d_model), p + "self_attn.q_proj.bias": (d_model,),
                   p + "self_attn.k_proj.weight": (kv, d_model), p + "self_attn.k_proj.bias": (kv,),
                   p + "self_attn.v_proj.weight": (kv, d_model), p + "self_attn.v_proj.bias": (kv,),
                   p + "self_attn.o_proj.weight": (d_model, d_model),
                   p + "post_attention_layernorm.weight": (d_model,),
                   p + "mlp.gate_proj.weight": (hidden, d_model), p + "mlp.up_proj.weight": (hidden, d_model),
                   p + "mlp.down_proj.weight": (d_model, hidden)}
    shapes |= {"model.norm.weight": (d_model,), "lm_head.weight": (vocab, d_model)}
    tensors = _random_tensors(shapes, seed, head="lm_head.weight", head_scale=head_scale, dtype=dtype)
    _write_json(os.path.join(directory, "config.json"), config)
    _write_weights(directory, tensors, shard)
    return os.fspath(directory)


def write_tiny_llada2(directory, *, seed: int = 0, n_layers: int = 3, d_model: int = 64, n_heads: int = 4,
                      n_kv_heads: int = 2, head_dim: int = 16, partial_rotary_factor: float = 0.5,
                      intermediate_size: int = 96, num_experts: int = 8, num_experts_per_tok: int = 3,
                      n_group: int = 4, topk_group: int = 2, num_shared_experts: int = 1,
                      moe_intermediate_size: int = 24, first_k_dense_replace: int = 1,
                      routed_scaling_factor: float = 2.5, use_qk_norm: bool = True, vocab: int = 320,
                      max_position_embeddings: int = 512, rope_theta: float = 600000.0,
                      head_scale: float = 1.0, shard: bool = True, generation_config: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> str:
    """A LLaDA2 (`llada2_moe`) checkpoint directory with random weights: the
    first `first_k_dense_replace` layers dense, the rest sparse MoE (random
    expert_bias, so it steers the routing). Like the released config.json it
    names neither the mask nor the EOS id (the tokenizer does).
    `generation_config` is written to generation_config.json when given."""
    tok = write_tokenizer(directory, "llada2", vocab_size=vocab)
    eos = tok.token_to_id("<|endoftext|>")
    config = {
        "model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"],
        "hidden_size": d_model, "intermediate_size": intermediate_size, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": head_dim,
        "partial_rotary_factor": partial_rotary_factor, "rope_theta": rope_theta, "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "use_qkv_bias": False, "use_bias": False, "use_qk_norm": use_qk_norm, "norm_head": False,
        "tie_word_embeddings": False, "num_experts": num_experts, "num_shared_experts": num_shared_experts,
        "num_experts_per_tok": num_experts_per_tok, "n_group": n_group, "topk_group": topk_group,
        "routed_scaling_factor": routed_scaling_factor, "moe_intermediate_size": moe_intermediate_size,
        "first_k_dense_replace": first_k_dense_replace, "score_function": "sigmoid", "norm_topk_prob": True,
        "router_dtype": "fp32", "vocab_size": vocab, "pad_token_id": eos, "torch_dtype": "bfloat16",
    }
    qkv = (n_heads + 2 * n_kv_heads) * head_dim
    shapes = {"model.word_embeddings.weight": (vocab, d_model)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d_model,), p + "post_attention_layernorm.weight": (d_model,),
                   p + "attention.query_key_value.weight": (qkv, d_model),
                   p + "attention.dense.weight": (d_model, n_heads * head_dim)}
        if use_qk_norm:
            shapes |= {p + "attention.query_layernorm.weight": (head_dim,),
                       p + "attention.key_layernorm.weight": (head_dim,)}
        mlps = {p + "mlp.": intermediate_size}
        if i >= first_k_dense_replace:
            shapes |= {p + "mlp.gate.weight": (num_experts, d_model), p + "mlp.gate.expert_bias": (num_experts,)}
            mlps = {f"{p}mlp.experts.{e}.": moe_intermediate_size for e in range(num_experts)}
            if num_shared_experts:
                mlps[p + "mlp.shared_experts."] = moe_intermediate_size * num_shared_experts
        for prefix, width in mlps.items():
            shapes |= {prefix + "gate_proj.weight": (width, d_model), prefix + "up_proj.weight": (width, d_model),
                       prefix + "down_proj.weight": (d_model, width)}
    shapes |= {"model.norm.weight": (d_model,), "lm_head.weight": (vocab, d_model)}
    tensors = _random_tensors(shapes, seed, head="lm_head.weight", head_scale=head_scale, dtype=dtype)
    _write_json(os.path.join(directory, "config.json"), config)
    if generation_config is not None:
        _write_json(os.path.join(directory, "generation_config.json"), generation_config)
    _write_weights(directory, tensors, shard)
    return os.fspath(directory)


def _random_tensors(shapes: dict, seed: int, *, head: str, head_scale: float, dtype) -> dict:
    """Random weights with sensible scales (never all zeros or all ones):
    norms near 1, matrices ~ N(0, 1/fan_in), embeddings and biases ~ N(0, 1) / 2."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * noise
        elif len(shape) == 1 or "wte" in name or "embed_tokens" in name or "word_embeddings" in name:
            t = 0.5 * noise
        else:
            t = noise / math.sqrt(shape[1])
        if name == head:
            t = t * head_scale
        tensors[name] = t.to(dtype).contiguous()
    return tensors


def _write_weights(directory, tensors: dict, shard: bool) -> None:
    metadata = {"format": "pt"}
    if not shard:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata=metadata)
        return
    names = list(tensors)
    n_shards = 3
    weight_map = {}
    for s in range(n_shards):
        file = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, os.path.join(directory, file), metadata=metadata)
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(os.path.join(directory, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def main(argv=None) -> None:
    """`python -m dfastllm.testing DIR [--family llada|dream|llada2]`: write a tiny
    random checkpoint to serve or benchmark without downloading weights (it
    answers with random text: it exercises the server, it knows nothing)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dfastllm.testing", description=main.__doc__)
    parser.add_argument("directory")
    parser.add_argument("--family", choices=("llada", "dream", "llada2"), default="llada")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write = {"llada": write_tiny_llada, "dream": write_tiny_dream, "llada2": write_tiny_llada2}[args.family]
    print(write(args.directory, seed=args.seed))


if __name__ == "__main__":
    main()
