"""Fixtures of the HTTP tests: a tiny LLaDA checkpoint, and the app over an
in-process engine (see asgi_driver.py). Black-box tests start `dfastllm
serve` itself (test_serve_blackbox.py)."""

from __future__ import annotations

import pytest
import torch

from asgi_driver import MAX_MODEL_LEN, running_app
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_llada

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    return write_tiny_llada(tmp_path_factory.mktemp("tiny-llada"), seed=5, max_sequence_length=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def api(tiny_model):
    async with running_app(tiny_model) as app:
        yield app
