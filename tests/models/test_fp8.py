"""FP8 weights: the e4m3 projection against the full-precision one, the
loader's conversion (what becomes e4m3 and what stays), the engine running
on it, and the refusals (where torch._scaled_mm cannot run, and LLaDA2)."""

import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.llm import LLM
from dfastllm.models import load_model
from dfastllm.models.fp8 import E4M3, Fp8Linear

pytestmark = pytest.mark.timeout(60)


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_close_to_the_full_precision_one(dtype):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen) * torch.rand(80, 1, generator=gen) * 3)
        linear.bias.copy_(torch.randn(80, generator=gen))
    x = torch.randn(2, 7, 96, generator=gen).to(dtype)
    fp8 = Fp8Linear(linear)
    assert fp8.weight.dtype == E4M3 and fp8.weight_scale.shape == (1, 80)
    y = fp8(x)
    assert y.shape == (2, 7, 80) and y.dtype == dtype
    # e4m3 keeps 3 mantissa bits: a few percent per product, less in the sums.
    assert _relative_error(y, linear(x)) < 0.05


@pytest.mark.parametrize("fixture", ["llada_gqa_dir", "dream_dir"])
def test_loader_converts_the_block_projections_only(fixture, request):
    directory = request.getfixturevalue(fixture)
    full = load_model(directory)
    fp8 = load_model(directory, quantization="fp8")
    block = fp8.model.layers[0]
    for linear in (block.attn.wqkv, block.attn.wo, block.mlp.w_gate_up, block.mlp.w_down):
        assert isinstance(linear, Fp8Linear) and linear.weight.dtype == E4M3
    assert (block.attn.wqkv.bias is not None) == (fp8.family == "dream")
    for name in ("embed.weight", "norm.weight", "output.weight", "layers.0.attn_norm.weight"):
        assert fp8.model.get_parameter(name).dtype == torch.float32
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(19).expand(2, 19)
    with torch.inference_mode():
        error = _relative_error(fp8.model(ids, positions), full.model(ids, positions))
    assert 0 < error < 0.1


def test_engine_runs_on_fp8_weights(llada_dir):
    llm = LLM(load_model(llada_dir, quantization="fp8"), kv_cache="dual")
    out = llm.generate([[40, 41, 42, 43]], SamplingParams(max_tokens=16, block_length=8, temperature=0.0))
    assert out[0].num_steps > 0


def test_unknown_quantization_and_unsupported_scaled_mm_are_refused(llada_dir, monkeypatch):
    with pytest.raises(ValueError, match=r"quantization must be one of \(None, 'fp8'\), got 'int4'"):
        load_model(llada_dir, quantization="int4")

    def unsupported(*args, **kwargs):  # what a torch without row-wise fp8 GEMMs raises
        raise RuntimeError("Expected scale_a to be a scalar (per-tensor scaling only)")
    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    with pytest.raises(ValueError, match=r"quantization fp8 needs torch\._scaled_mm with row-wise scales "
                                         r"and torch.float32 output on cpu.*per-tensor scaling only"):
        load_model(llada_dir, quantization="fp8")


def test_the_quantization_setting_reaches_the_loader(llada_dir):
    """`--quantization fp8` (ServerConfig, LLM) loads the projections in e4m3; "none" leaves them."""
    fp8 = LLM(llada_dir, quantization="fp8")
    assert isinstance(fp8.loaded.model.layers[0].mlp.w_down, Fp8Linear)
    assert isinstance(LLM(llada_dir).loaded.model.layers[0].mlp.w_down, torch.nn.Linear)
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(llada_dir, quantization="int4")


def test_llada2_refuses_fp8(llada2_dir):
    """LLaDA2's routed experts (most of its weights) are stacked parameters
    multiplied by grouped GEMMs with no fp8 path: refused, not half-converted."""
    with pytest.raises(ValueError, match="not supported for LLaDA2"):
        load_model(llada2_dir, quantization="fp8")
