import pytest
import torch
from model_reference import DREAM_NAMES, key_padding_mask, read_checkpoint, reference_hidden, reference_logits

from dfastllm.models import KVCache, load_model

pytestmark = pytest.mark.timeout(60)


def test_shifted_logits_match_per_position_reference(dream_dir):
    loaded = load_model(dream_dir)
    model, c = loaded.model, loaded.config
    assert (c.n_heads, c.n_kv_heads) == (4, 2) and model.logits_shift == 1
    w = read_checkpoint(dream_dir)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (1, 6), generator=gen)
    positions = torch.arange(3, 9)[None]
    hidden = model(ids, positions)
    logits = model.full_logits(hidden)[0].double()                                    # [T, V]

    ref_hidden = reference_hidden(w, DREAM_NAMES, c.n_layers, c.n_heads, c.n_kv_heads, c.rope_theta,
                                  c.rms_norm_eps, ids[0].tolist(), positions[0].tolist())
    torch.testing.assert_close(hidden[0].double(), ref_hidden, atol=1e-4, rtol=1e-4)
    ref = reference_logits(w, DREAM_NAMES, ref_hidden, c.rms_norm_eps)                # unshifted
    # Position i is predicted from hidden i - 1; position 0 from hidden 0.
    for i in range(6):
        torch.testing.assert_close(logits[i], ref[max(i - 1, 0)], atol=1e-4, rtol=1e-4)
    # What the engine does: head over row i - logits_shift.
    torch.testing.assert_close(model.head(hidden[0, 4 - model.logits_shift]).double(), ref[3],
                               atol=1e-4, rtol=1e-4)


def test_left_padding_leaves_real_positions_unchanged(dream_dir):
    # Dream's reference pads on the left with positions cumsum(mask) - 1.
    model = load_model(dream_dir).model
    gen = torch.Generator().manual_seed(1)
    short = torch.randint(0, 320, (1, 5), generator=gen)
    other = torch.randint(0, 320, (1, 9), generator=gen)
    alone = model(short, torch.arange(5)[None])
    batch = torch.cat([torch.cat([torch.randint(0, 320, (1, 4), generator=gen), short], 1), other])
    real = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    positions = (real.cumsum(1) - 1).clamp(min=0)
    hidden = model(batch, positions, key_padding_mask([5, 9], 9, left=True))
    torch.testing.assert_close(hidden[0, 4:], alone[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_sub_range_equals_full_forward(dream_dir):
    model = load_model(dream_dir).model
    c = model.config
    gen = torch.Generator().manual_seed(2)
    B, T = 2, 9
    ids = torch.randint(0, 320, (B, T), generator=gen)
    positions = torch.arange(T).expand(B, T)
    full = model(ids, positions)
    cache = KVCache.allocate(c, B, T, dtype=torch.float32, device="cpu")
    model(ids, positions, None, cache, positions)
    for k in cache.k:
        k[:, :, 2:5] = torch.randn(B, c.n_kv_heads, 3, c.head_dim, generator=gen)
    sub = model(ids[:, 2:5], positions[:, 2:5], None, cache, positions[:, 2:5])
    torch.testing.assert_close(sub, full[:, 2:5], atol=1e-5, rtol=1e-5)
