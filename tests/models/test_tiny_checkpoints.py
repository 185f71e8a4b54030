import json
import os

import pytest
import torch

from dfastllm.models import load_model
from dfastllm.testing import write_tiny_dream, write_tiny_llada

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("write", [write_tiny_llada, write_tiny_dream])
def test_head_scale_makes_a_confident_checkpoint(write, tmp_path):
    def confidence(directory):
        loaded = load_model(directory)
        ids = torch.full((1, 24), loaded.mask_token_id)
        ids[0, :6] = torch.tensor([40, 41, 42, 43, 44, 45])
        logits = loaded.model.full_logits(loaded.model(ids, torch.arange(24)[None]))[0, 6:]
        return logits.softmax(-1).max(-1).values                                  # [18]

    assert confidence(write(tmp_path / "flat")).max() < 0.5
    assert confidence(write(tmp_path / "sharp", head_scale=30.0)).min() > 0.9


def test_seed_decides_the_weights_and_config_uses_real_field_names(tmp_path):
    a = load_model(write_tiny_llada(tmp_path / "a", seed=5)).model.state_dict()
    b = load_model(write_tiny_llada(tmp_path / "b", seed=5)).model.state_dict()
    c = load_model(write_tiny_llada(tmp_path / "c", seed=6)).model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.attn.wqkv.weight"], c["layers.0.attn.wqkv.weight"])
    assert all(t.abs().sum() > 0 for t in a.values())

    with open(os.path.join(tmp_path / "a", "config.json")) as f:
        config = json.load(f)
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                  "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps",
                  "mask_token_id", "eos_token_id", "pad_token_id", "weight_tying", "block_type",
                  "activation_type", "layer_norm_type", "include_bias", "include_qkv_bias", "rope",
                  "rope_full_precision", "scale_logits"):
        assert field in config, field
