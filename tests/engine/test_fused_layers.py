"""The layer's fused kernels (add_rms_norm, rope_write_kv, silu_mul) leave the
engine's tokens at temperature 0 as their plain-torch references give them:
both families (Dream with grouped heads), every cache mode, fp32 and bf16,
a ragged batch of rows of different lengths."""

import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.models import layers, load_model
from dfastllm.testing import write_tiny_dream, write_tiny_llada

from .conftest import generate, prompt

WRITERS = {"llada": lambda d: write_tiny_llada(d, seed=21),
           "dream": lambda d: write_tiny_dream(d, seed=22, n_heads=4, n_kv_heads=2)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {family: write(tmp_path_factory.mktemp(family)) for family, write in WRITERS.items()}


def _requests():
    params = SamplingParams(max_tokens=12, block_length=4, steps=6, temperature=0.0, ignore_eos=True)
    return [("a", prompt(5), params), ("b", prompt(11, start=80), params), ("c", prompt(3, start=33), params)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_kernels_give_the_references_tokens(family, dtype, checkpoints, monkeypatch):
    loaded = load_model(checkpoints[family], dtype=dtype)
    for kv_cache in ("none", "prefix", "dual"):
        fused = generate(loaded, _requests(), kv_cache=kv_cache)
        with monkeypatch.context() as m:
            m.setattr(layers, "plain_torch", lambda x, weight: True)
            reference = generate(loaded, _requests(), kv_cache=kv_cache)
        assert {rid: tokens for rid, (tokens, _) in fused.items()} == \
               {rid: tokens for rid, (tokens, _) in reference.items()}, kv_cache
