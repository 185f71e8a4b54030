"""FP8 weights (`quantization="fp8"`): every projection of the blocks (q|k|v,
o, gate|up, down) holds e4m3 weights with one fp32 scale per output channel,
converted at load from the bf16/fp32 checkpoint, and multiplies with
`torch._scaled_mm`. Activations are quantized per token on the fly (e4m3,
one scale per row), the product accumulates in fp32 and comes out in the
model's dtype. The embedding, the norms and the output head stay in the
model's dtype: the head is where the tokens are chosen, and it is read on
the candidate rows only.

Half the weight bytes of bf16: the cached step, which reads every weight
once, is bound by that read.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
TINY = 1e-12  # lower bound of a scale: an all-zero row or channel stays zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (e4m3 [N, K], fp32 scales [N, 1]) with x ~ q * scale per row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=TINY) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W in e4m3 and a scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)                                  # [out, in] e4m3
        self.register_buffer("weight_scale", scale.view(1, -1))                 # [1, out] fp32
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        y = torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=self.out_dtype)
        return y.view(*x.shape[:-1], -1)


def quantize_fp8(model: nn.Module) -> nn.Module:
    """Replaces every nn.Linear inside the transformer blocks with an
    Fp8Linear, in place, one at a time (the bf16 copy of each is freed as it
    goes). Raises ValueError where `_scaled_mm` cannot run for this device and
    dtype, before touching the model."""
    weight = model.output.weight
    check_scaled_mm(weight.device, weight.dtype)
    for block in model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fp8Linear(child))
    return model


def check_scaled_mm(device: torch.device, dtype: torch.dtype) -> None:
    """Runs one small row-scaled e4m3 product on `device` with `dtype` output."""
    try:
        a, scale_a = quantize_rows(torch.randn(16, 32, device=device))
        b, scale_b = quantize_rows(torch.randn(16, 32, device=device))
        torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b.view(1, -1), out_dtype=dtype)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
        raise ValueError(f"quantization fp8 needs torch._scaled_mm with row-wise scales and {dtype} output "
                         f"on {device}, which this torch ({torch.__version__}) cannot run: {e}") from None
