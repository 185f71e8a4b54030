"""Fixtures of the HTTP tests.

App-level tests run the real app (`create_app`) over an
`InProcessEngineClient` (the real EngineCore in a thread) on a tiny LLaDA
checkpoint, inside the ASGI lifespan (`falcon.testing.ASGIConductor`).
Black-box tests start `dfastllm serve` itself (see test_blackbox.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from falcon.testing import ASGIConductor

from dfastllm.config import ServerConfig
from dfastllm.engine.client import InProcessEngineClient
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_llada
from server.app import create_app
from asgi_driver import AsgiClient

torch.set_num_threads(1)

MODEL = "tiny"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    return write_tiny_llada(tmp_path_factory.mktemp("tiny-llada"), seed=5, max_sequence_length=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture
def anyio_backend():
    return "asyncio"


class RunningApp(AsgiClient):
    def __init__(self, app, engine: InProcessEngineClient, config: ServerConfig):
        super().__init__(app)
        self.engine = engine
        self.config = config


@contextlib.asynccontextmanager
async def running_app(tiny_model, **config_fields):
    """The app over an in-process engine, started and stopped through its lifespan."""
    config = ServerConfig(model=tiny_model.path, served_model_name=MODEL, **config_fields)
    engine = InProcessEngineClient(tiny_model, config)
    app = create_app(config, engine, tokenizer=tiny_model.tokenizer)
    async with ASGIConductor(app):
        yield RunningApp(app, engine, config)


@pytest.fixture
async def api(tiny_model):
    async with running_app(tiny_model) as app:
        yield app
