"""Relative error of FP8 weights (e4m3, per-output-channel scales, per-token
activation scales, torch._scaled_mm) against bf16, on random layers of the
8B LLaDA shape: ||h_fp8 - h_bf16|| / ||h_bf16|| of the final hidden states
(after the final norm), and the share of argmax tokens of the head that agree.

    python benchmarks/fp8_error.py                    # 2 layers, 64 tokens, CPU
    python benchmarks/fp8_error.py --layers 32 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # benchmarks/ (engine.py's shapes)
from engine import synthetic_model  # noqa: E402

from dfastllm.models.fp8 import quantize_fp8  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = synthetic_model("llada-8b", torch.device(args.device), torch.bfloat16, n_layers=args.layers).model
    config = model.config
    with torch.device(args.device):
        fp8 = quantize_fp8(copy.deepcopy(model))
        ids = torch.randint(0, config.vocab_size, (1, args.tokens))
        positions = torch.arange(args.tokens)[None]
    with torch.inference_mode():
        h_bf16 = model.norm(model(ids, positions))[0].float()
        h_fp8 = fp8.norm(fp8(ids, positions))[0].float()
        agree = (model.output(h_bf16.bfloat16()).argmax(-1) == fp8.output(h_fp8.bfloat16()).argmax(-1))
    error = ((h_fp8 - h_bf16).norm() / h_bf16.norm()).item()
    result = dict(shape="llada-8b", layers=args.layers, tokens=args.tokens, device=args.device,
                  hidden_relative_error=round(error, 5), argmax_agreement=round(agree.float().mean().item(), 4))
    print(f"fp8 vs bf16, {args.layers} random 8B-shaped layers, {args.tokens} tokens: relative error of the "
          f"final hidden states {error:.4f}, head argmax agreement {result['argmax_agreement']:.1%}",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
