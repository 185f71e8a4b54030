"""Tiny checkpoints for the engine tests, written once per session and
loaded through `load_model` (fp32 on CPU), plus small drivers of EngineCore."""

import pytest
import torch

from dfastllm.engine import EngineCore
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_dream, write_tiny_llada

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llada(tmp_path_factory):
    return load_model(write_tiny_llada(tmp_path_factory.mktemp("llada"), seed=11))


@pytest.fixture(scope="session")
def llada_gqa(tmp_path_factory):
    return load_model(write_tiny_llada(tmp_path_factory.mktemp("llada_gqa"), seed=12, n_kv_heads=2))


@pytest.fixture(scope="session")
def dream(tmp_path_factory):
    return load_model(write_tiny_dream(tmp_path_factory.mktemp("dream"), seed=13))


@pytest.fixture(scope="session")
def confident_llada(tmp_path_factory):
    """A large output head: peaked logits, so threshold decoding commits many
    tokens per step and small numeric differences never flip a choice."""
    return load_model(write_tiny_llada(tmp_path_factory.mktemp("llada_confident"), seed=14, head_scale=30.0))


def prompt(n: int, start: int = 40) -> list[int]:
    """n ordinary token ids (no special tokens: those take the lowest ids)."""
    return [start + (7 * i) % 200 for i in range(n)]


def run_all(core: EngineCore, max_steps: int = 10_000) -> dict:
    """Step until nothing is left; -> request id -> (tokens, last output)."""
    tokens, last = {}, {}
    for _ in range(max_steps):
        if not core.has_unfinished():
            break
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            last[out.request_id] = out
    assert not core.has_unfinished(), "the engine did not finish"
    return {rid: (tokens[rid], last[rid]) for rid in last}


def generate(loaded, requests, **engine_kwargs) -> dict:
    """requests: [(id, prompt_ids, params)] added together; -> id -> (tokens, last output)."""
    core = EngineCore(loaded, **engine_kwargs)
    for rid, ids, params in requests:
        core.add_request(rid, ids, params)
    return run_all(core)
