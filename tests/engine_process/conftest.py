"""Fixtures of the engine-process tests: a tiny checkpoint, and one real
engine process (started through the supervisor's functions, no HTTP) shared
by a module's tests."""

import pytest

from dfastllm.testing import write_tiny_llada

from .helpers import RunningEngine, engine_config


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory):
    return write_tiny_llada(tmp_path_factory.mktemp("tiny-llada"), seed=21)


@pytest.fixture(scope="module")
def engine(tiny_llada_dir):
    running = RunningEngine(engine_config(tiny_llada_dir))
    yield running
    running.stop()
