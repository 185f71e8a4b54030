"""One way to build an EngineCore from a ServerConfig (`dfastllm.engine.build`):
the engine process, the in-process client and `LLM` all go through it, and
the engine package stays below the offline API."""

import ast
import os

import torch

import dfastllm.engine
from dfastllm import LLM, SamplingParams
from dfastllm.config import ServerConfig
from dfastllm.engine.build import build_engine_core
from dfastllm.engine.client import InProcessEngineClient


def test_no_engine_module_imports_the_offline_api():
    folder = os.path.dirname(dfastllm.engine.__file__)
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".py"):
            continue
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "dfastllm.llm" or n.startswith("dfastllm.llm.") for n in names), file
            if isinstance(node, ast.ImportFrom) and node.module == "dfastllm":
                assert "LLM" not in [a.name for a in node.names], file


def test_every_setting_reaches_the_core(llada):
    config = ServerConfig(kv_cache="dual", max_batch_size=3, max_num_batched_tokens=900, max_model_len=200, seed=7,
                          cuda_graphs=False)
    for core in (build_engine_core(config, llada), InProcessEngineClient(llada, config).core,
                 LLM(llada, kv_cache="dual", max_batch_size=3, max_num_batched_tokens=900, max_model_len=200, seed=7,
                     cuda_graphs=False).engine):
        assert (core.kv_cache, core.scheduler.max_batch_size, core.scheduler.max_num_batched_tokens, core.max_model_len) \
            == ("dual", 3, 900, 200)
        assert core._seeds.getrandbits(63) == build_engine_core(config, llada)._seeds.getrandbits(63)


def test_a_config_loads_the_model_on_its_device_and_dtype(tmp_path):
    from dfastllm.testing import write_tiny_llada

    config = ServerConfig(model=write_tiny_llada(tmp_path, seed=4), device="cpu", dtype="bfloat16")
    core = build_engine_core(config)
    assert next(core.model.parameters()).dtype == torch.bfloat16 and core.device.type == "cpu"


def test_the_seed_makes_unseeded_sampling_reproducible(llada):
    params = SamplingParams(max_tokens=8, temperature=1.0)
    first, second = (LLM(llada, seed=5).generate([[100, 101, 102]] * 2, params) for _ in range(2))
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
