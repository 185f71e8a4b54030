import pytest
import torch
from model_reference import LLADA_NAMES, key_padding_mask, read_checkpoint, reference_hidden, reference_logits

from dfastllm.models import KVCache, load_model

pytestmark = pytest.mark.timeout(60)


def _check_against_reference(directory, ids, positions):
    loaded = load_model(directory)
    c = loaded.config
    w = read_checkpoint(directory)
    hidden = loaded.model(ids, positions)
    for b in range(ids.shape[0]):
        ref = reference_hidden(w, LLADA_NAMES, c.n_layers, c.n_heads, c.n_kv_heads, c.rope_theta,
                               c.rms_norm_eps, ids[b].tolist(), positions[b].tolist())
        torch.testing.assert_close(hidden[b].double(), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded.model.head(hidden[b]).double(),
                                   reference_logits(w, LLADA_NAMES, ref, c.rms_norm_eps),
                                   atol=1e-4, rtol=1e-4)


def test_forward_matches_independent_reference(llada_dir):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (2, 6), generator=gen)
    # Each row has its own positions (the second starts at 9).
    positions = torch.stack([torch.arange(6), torch.arange(9, 15)])
    _check_against_reference(llada_dir, ids, positions)


def test_grouped_query_attention_matches_reference(llada_gqa_dir):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (1, 5), generator=gen)
    _check_against_reference(llada_gqa_dir, ids, torch.arange(5)[None])


def test_right_padding_leaves_real_positions_unchanged(llada_dir):
    model = load_model(llada_dir).model
    gen = torch.Generator().manual_seed(2)
    short = torch.randint(0, 320, (1, 7), generator=gen)
    other = torch.randint(0, 320, (1, 11), generator=gen)
    alone = model(short, torch.arange(7)[None])
    # Pad with random ids, not a pad token: the mask alone must hide them.
    batch = torch.cat([torch.cat([short, torch.randint(0, 320, (1, 4), generator=gen)], 1), other])
    mask = key_padding_mask([7, 11], 11)
    hidden = model(batch, torch.arange(11).expand(2, 11), mask)
    torch.testing.assert_close(hidden[0, :7], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[1], model(other, torch.arange(11)[None])[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_sub_range_equals_full_forward(llada_gqa_dir):
    model = load_model(llada_gqa_dir).model
    c = model.config
    gen = torch.Generator().manual_seed(3)
    B, T, S = 2, 10, 16  # the cache is longer than the sequence: slots >= T are masked
    ids = torch.randint(0, 320, (B, T), generator=gen)
    positions = torch.arange(T).expand(B, T)
    full = model(ids, positions)

    cache = KVCache.allocate(c, B, S, dtype=torch.float32, device="cpu")
    mask = key_padding_mask([T, T], S)[:, :, :T]                                      # [B, 1, T, S]
    torch.testing.assert_close(model(ids, positions, mask, cache, positions), full, atol=1e-5, rtol=1e-5)
    written = [k.clone() for k in cache.k]

    # Scramble the block's slots; the sub-range forward must write them back
    # in place and attend over the rest from the cache.
    block = slice(4, 8)
    for k, v in zip(cache.k, cache.v):
        k[:, :, block] = torch.randn(B, c.n_kv_heads, 4, c.head_dim, generator=gen)
        v[:, :, block] = torch.randn(B, c.n_kv_heads, 4, c.head_dim, generator=gen)
    sub = model(ids[:, block], positions[:, block], mask[:, :, block], cache, positions[:, block])
    torch.testing.assert_close(sub, full[:, block], atol=1e-5, rtol=1e-5)
    for k, k_before in zip(cache.k, written):
        torch.testing.assert_close(k, k_before, atol=1e-6, rtol=1e-6)


def test_head_on_selected_rows_and_bf16(llada_dir):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 320, (2, 8), generator=gen)
    positions = torch.arange(8).expand(2, 8)
    fp32 = load_model(llada_dir)
    assert next(fp32.model.parameters()).dtype == torch.float32  # CPU default
    hidden = fp32.model(ids, positions)
    rows = hidden[torch.tensor([0, 1]), torch.tensor([3, 7])]                         # [2, D]
    torch.testing.assert_close(fp32.model.head(rows), fp32.model.full_logits(hidden)[[0, 1], [3, 7]])

    bf16 = load_model(llada_dir, dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    logits = bf16.model.head(bf16.model(ids, positions))
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), fp32.model.head(hidden), atol=0.15, rtol=0.05)
