"""Tiny checkpoints, written once per session."""

import pytest

from dfastllm.testing import write_tiny_dream, write_tiny_llada, write_tiny_llada2


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory):
    return write_tiny_llada(tmp_path_factory.mktemp("llada"), seed=1)


@pytest.fixture(scope="session")
def llada_gqa_dir(tmp_path_factory):
    return write_tiny_llada(tmp_path_factory.mktemp("llada_gqa"), seed=2, n_heads=4, n_kv_heads=2,
                            shard=True)


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory):
    return write_tiny_dream(tmp_path_factory.mktemp("dream"), seed=3, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="session")
def llada2_dir(tmp_path_factory):
    return write_tiny_llada2(tmp_path_factory.mktemp("llada2"), seed=4)
