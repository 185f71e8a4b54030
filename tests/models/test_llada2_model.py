"""LLaDA2: our forward, router and grouped experts against the plain-torch
reference of the published code (tests/models/llada2_reference.py), on a
tiny checkpoint in the published layout (sharded, one dense layer, MoE
layers with groups and a shared expert, QK-norm, partial rotary)."""

import json
import logging
import os
import shutil

import pytest
import torch
from llada2_reference import ReferenceLLaDA2

from dfastllm.models import KVCache, load_model
from dfastllm.models.llada2 import block_causal_mask
from dfastllm.models.loader import _special_id
from dfastllm.models.moe import grouped_experts, per_expert_reference, route

pytestmark = pytest.mark.timeout(60)


def test_forward_matches_published_reference(llada2_dir):
    loaded = load_model(llada2_dir)
    reference = ReferenceLLaDA2(llada2_dir)
    gen = torch.Generator().manual_seed(0)
    T, block = 13, 4  # the last block is cut short
    ids = torch.randint(0, 320, (2, T), generator=gen)
    mask = block_causal_mask(T, block)
    logits = loaded.model.full_logits(loaded.model(ids, torch.arange(T).expand(2, T), mask[None, None]))
    for b in range(2):
        expected = reference.logits(ids[b].tolist(), mask)
        torch.testing.assert_close(logits[b].double(), expected, atol=1e-4, rtol=1e-4)


def test_block_causal_attention_ignores_later_blocks(llada2_dir):
    model = load_model(llada2_dir).model
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (1, 12), generator=gen)
    changed = ids.clone()
    changed[0, 8:] = torch.randint(0, 320, (4,), generator=gen)
    mask = block_causal_mask(12, 4)[None, None]
    positions = torch.arange(12)[None]
    a, b = model(ids, positions, mask), model(changed, positions, mask)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_routing_matches_published_gate(llada2_dir):
    """Same experts, in the same order, with the same weights; the expert
    bias changes the choice and not the weights."""
    loaded = load_model(llada2_dir)
    reference = ReferenceLLaDA2(llada2_dir)
    router = loaded.model.layers[1].mlp.router
    hidden = torch.randn(37, loaded.config.d_model, generator=torch.Generator().manual_seed(2))
    experts, weights = route(hidden, router.weight, router.expert_bias, router.c)
    ref_experts, ref_weights = reference.gate("model.layers.1.mlp.", hidden.double())
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights.double(), ref_weights, atol=1e-6, rtol=1e-6)
    assert weights.dtype == torch.float32
    unbiased, _ = route(hidden, router.weight, torch.zeros_like(router.expert_bias), router.c)
    assert not torch.equal(unbiased, experts)  # the tiny checkpoint's bias matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [0, 1, 37])
def test_grouped_experts_equal_the_per_expert_loop(dtype, n_tokens):
    gen = torch.Generator().manual_seed(n_tokens)
    E, K, D, inner = 9, 3, 40, 24
    x = torch.randn(n_tokens, D, generator=gen).to(dtype)
    # Experts 0 and 5 get no token; the others a random share.
    choices = torch.tensor([e for e in range(E) if e not in (0, 5)])
    experts = torch.stack([choices[torch.randperm(len(choices), generator=gen)[:K]] for _ in range(n_tokens)]) \
        if n_tokens else torch.empty(0, K, dtype=torch.long)
    weights = torch.rand(n_tokens, K, generator=gen)
    w_gate, w_up = (torch.randn(E, inner, D, generator=gen).to(dtype) / D ** 0.5 for _ in range(2))
    w_down = torch.randn(E, D, inner, generator=gen).to(dtype) / inner ** 0.5
    expected = per_expert_reference(x, experts, weights, w_gate, w_up, w_down)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for plain_torch in (False, True):  # silu_mul's kernel, and its reference
        got = grouped_experts(x, experts, weights, torch.cat([w_gate, w_up], dim=1), w_down, plain_torch=plain_torch)
        assert got.dtype == dtype and got.shape == (n_tokens, D)
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_cached_block_step_equals_full_forward(llada2_dir):
    """The exact KV cache of block-causal attention: blocks 0..1 written once,
    then block 2's queries alone against the cache give the full forward's rows."""
    model = load_model(llada2_dir).model
    c = model.config
    gen = torch.Generator().manual_seed(3)
    T, block = 12, 4
    ids = torch.randint(0, 320, (1, T), generator=gen)
    positions = torch.arange(T)[None]
    mask = block_causal_mask(T, block)[None, None]
    full = model(ids, positions, mask)
    cache = KVCache.allocate(c, 1, T, dtype=torch.float32, device="cpu")
    model(ids[:, :8], positions[:, :8], mask[..., :8, :], cache, positions[:, :8])
    step = model(ids[:, 8:], positions[:, 8:], mask[..., 8:, :], cache, positions[:, 8:])
    torch.testing.assert_close(step, full[:, 8:], atol=1e-5, rtol=1e-5)


def test_special_ids_come_from_the_tokenizer_and_are_logged(llada2_dir, caplog):
    with caplog.at_level(logging.INFO, logger="dfastllm.models.loader"):
        loaded = load_model(llada2_dir)
    assert loaded.family == "llada2"
    assert loaded.mask_token_id == loaded.tokenizer.backend.token_to_id("<|mask|>")
    assert loaded.eos_token_id == loaded.tokenizer.backend.token_to_id("<|endoftext|>")
    assert loaded.eot_token_id == loaded.tokenizer.backend.token_to_id("<|role_end|>")
    assert "mask token id" in caplog.text and "from the tokenizer" in caplog.text


def test_special_id_sources_in_order():
    defaults = {"mask_token_id": 156895}
    assert _special_id("mask_token_id", {"mask_token_id": 7}, 3, defaults, "c.json") == (7, "config.json")
    assert _special_id("mask_token_id", {}, 3, defaults, "c.json") == (3, "the tokenizer")
    assert _special_id("mask_token_id", {}, None, defaults, "c.json") == (156895, "the family's default")
    with pytest.raises(ValueError, match="no eos_token_id"):
        _special_id("eos_token_id", {}, None, defaults, "c.json")


def _edit_config(src, tmp_path, **changes):
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | changes))
    return d


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"n_group": 3}, "n_group"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok"),
    ({"score_function": "softmax"}, "score_function"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_unsupported_config_is_refused_by_name(llada2_dir, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_model(_edit_config(llada2_dir, tmp_path, **changes))


def test_missing_expert_tensor_is_named(llada2_dir, tmp_path):
    d = _edit_config(llada2_dir, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    assert name in index["weight_map"]
    from safetensors.torch import load_file, save_file
    shard = d / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor model.layers.2.mlp.experts.5.up_proj.weight"):
        load_model(d)
    assert os.path.exists(d / "config.json")


def test_bf16_checkpoint_runs_the_same_model(llada2_dir):
    """bf16 weights (the released dtype): the router still computes in fp32, the
    grouped GEMMs run in bf16, and the logits stay near the fp32 ones."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 320, (1, 12), generator=gen)
    positions, mask = torch.arange(12)[None], block_causal_mask(12, 4)[None, None]
    fp32 = load_model(llada2_dir).model
    bf16 = load_model(llada2_dir, dtype=torch.bfloat16).model
    assert bf16.layers[1].mlp.w_gate_up.dtype == bf16.layers[1].mlp.router.expert_bias.dtype == torch.bfloat16
    logits = bf16.full_logits(bf16(ids, positions, mask))
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), fp32.full_logits(fp32(ids, positions, mask)), atol=0.2, rtol=0.05)
