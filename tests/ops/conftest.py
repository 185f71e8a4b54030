"""Shared fixtures of the kernel tests: the devices to run on and fresh random
inputs every run (the seed is printed, so a failure can be replayed with
DFASTLLM_TEST_SEED=<seed>)."""

from __future__ import annotations

import os
import random

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _few_threads():
    # Two threads: exercises the row split while sharing the 2-core CI box.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("DFASTLLM_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"DFASTLLM_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def make_logits(n: int, v: int, dtype: torch.dtype, device: str, gen: torch.Generator, *,
                pad: int = 0, lead: int = 0, scale: float = 3.0) -> torch.Tensor:
    """Random logits [n, v]; pad > 0 gives a row stride of v + pad + lead and
    lead > 0 a storage offset, both as views of a larger tensor."""
    full = torch.randn(n, lead + v + pad, generator=gen) * scale
    return full.to(dtype).to(device)[:, lead:lead + v]
