"""The engine on a CUDA device: the CPU suite's end-to-end checks again with
the model, canvas, cache and kernels on the GPU. Skipped without one;
`scripts/gpu_check.sh` runs this file on a GPU machine.

* LLaDA's reference decoding, token for token (kv_cache none, fp32);
* batched equals alone, in both KV modes (fp32: the grouped attention);
* the cached steps replayed as CUDA graphs (bf16: torch's varlen flash
  attention reading the pages in place) give the eager steps' tokens on the
  same bucket-padded inputs, across batch sizes, Dream's shift and new
  buckets captured mid-run;
* LLaDA2's cached block steps (MoE experts as grouped GEMMs) captured as
  CUDA graphs give the eager steps' tokens;
* steps prepared while the previous one runs (and replays) give the tokens
  of steps built after the read-back;
* the embedded tiny-llada gives the same tokens on CUDA as on the CPU (fp32),
  and in bf16 (the CUDA default) still answers the families it has learned.
"""

import os
import sys

import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.checkpoints import DEFAULT_MODEL_DIR
from dfastllm.engine import EngineCore
from dfastllm.llm import LLM
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_dream, write_tiny_llada, write_tiny_llada2

from .conftest import prompt, run_all
from .test_continuous_batching import assert_batched_equals_alone
from .test_kv_cache import _mixed
from .test_prepare_ahead import SCHEDULES, _drive
from .test_reference_parity import assert_engine_matches_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tools"))
import tiny_tasks  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.timeout(180)]

GREEDY_CHAT = SamplingParams(max_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def cuda_models(tmp_path_factory):
    """The engine suite's tiny random checkpoints (same seeds), loaded in fp32 on CUDA."""
    def load(writer, name, seed):
        return load_model(writer(tmp_path_factory.mktemp(name), seed=seed), device="cuda", dtype=torch.float32)
    return {"llada": load(write_tiny_llada, "llada", 11), "dream": load(write_tiny_dream, "dream", 13)}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_engine_matches_reference_on_cuda(cuda_models, family):
    assert_engine_matches_reference(cuda_models[family])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kv_cache", ["none", "dual"])
def test_batched_equals_alone_on_cuda(cuda_models, family, kv_cache):
    assert_batched_equals_alone(cuda_models[family], kv_cache)


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """The same checkpoints in bf16: CUDA graphs need the flash attention, which needs half precision."""
    def load(writer, name, seed):
        return load_model(writer(tmp_path_factory.mktemp(name), seed=seed), device="cuda", dtype=torch.bfloat16)
    return {"llada": load(write_tiny_llada, "llada16", 11), "dream": load(write_tiny_dream, "dream16", 13)}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kv_cache", ["dual", "prefix"])
def test_cuda_graphs_give_the_eager_tokens(bf16_models, family, kv_cache):
    def run(replay: bool):
        core = EngineCore(bf16_models[family], kv_cache=kv_cache)
        assert core.graphs is not None and core.pool.page_size == 256, "torch's flash attention reads pages"
        core.graphs.failed = not replay  # eager on the same padded inputs, as after a failed capture
        for rid, ids, params in _mixed():
            core.add_request(rid, ids, params)
        tokens = {}
        for _ in range(3):
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        # A longer request joins mid-run: a new bucket of tokens and rows is captured.
        late = SamplingParams(max_tokens=24, block_length=4, steps=12, ignore_eos=True)
        core.add_request("late", prompt(70, start=20), late)
        for rid, (rest, _) in run_all(core).items():
            tokens.setdefault(rid, []).extend(rest)
        return tokens, core

    (eager, _), (graphed, core) = run(False), run(True)
    assert core.graphs.captures >= 2 and not core.graphs.failed and core.kv_pages_used == 0
    assert graphed == eager and len(eager["late"]) == 24


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_prepared_steps_give_the_same_tokens_on_cuda(cuda_models, bf16_models, family):
    """fp32 (eager) in every schedule, and bf16 with the cached steps replayed as graphs."""
    runs = [(cuda_models, name, kv) for name in SCHEDULES for kv in ("none", "dual")]
    runs.append((bf16_models, "greedy", "dual"))
    for models, name, kv_cache in runs:
        ahead = _drive(models[family], SCHEDULES[name], kv_cache=kv_cache, prepare_ahead=True)
        plain = _drive(models[family], SCHEDULES[name], kv_cache=kv_cache, prepare_ahead=False)
        assert ahead[:2] == plain[:2], (name, kv_cache)
        assert ahead[2].steps_prepared_ahead > 0 and ahead[2].tokens_committed == plain[2].tokens_committed


def test_llada2_cuda_graphs_give_the_eager_tokens(tmp_path):
    """The router and the grouped experts capture (no host sync in them) and
    replay the eager steps' tokens, 2.0 threshold rule, several requests."""
    loaded = load_model(write_tiny_llada2(tmp_path, seed=5, head_scale=12.0), device="cuda", dtype=torch.bfloat16)
    params = [SamplingParams(max_tokens=12, block_length=4, temperature=0.0, threshold=0.9),
              SamplingParams(max_tokens=16, block_length=4, temperature=0.0, threshold=0.99)]

    def run(replay: bool):
        core = EngineCore(loaded, kv_cache="dual")
        if core.graphs is None:
            pytest.skip("this torch's varlen flash attention cannot read pages with grouped heads")
        core.graphs.failed = not replay
        for i in range(3):
            core.add_request(f"r{i}", prompt(5 + 4 * i, start=40 + 30 * i), params[i % 2])
        return {rid: tokens for rid, (tokens, _) in run_all(core).items()}, core

    (eager, _), (graphed, core) = run(False), run(True)
    assert core.graphs.captures >= 1 and not core.graphs.failed
    assert graphed == eager


def _chat(llm: LLM, tasks) -> list:
    return llm.chat([[{"role": "user", "content": t.prompt}] for t in tasks], GREEDY_CHAT)


@pytest.mark.parametrize("kv_cache", ["none", "dual"])
def test_embedded_model_gives_the_cpu_tokens_on_cuda(kv_cache):
    """A trained model is confident, so fp32 on either device must commit the
    same tokens in the same order: any difference is a kernel, mask or cache bug."""
    tasks = tiny_tasks.held_out_set(4)  # every family, wrong answers included
    cpu = _chat(LLM(DEFAULT_MODEL_DIR, device="cpu", kv_cache=kv_cache), tasks)
    cuda = _chat(LLM(DEFAULT_MODEL_DIR, device="cuda", dtype="float32", kv_cache=kv_cache), tasks)
    for task, a, b in zip(tasks, cpu, cuda):
        assert (b.token_ids, b.num_steps) == (a.token_ids, a.num_steps), task


@pytest.mark.parametrize("threshold", [None, 0.9])
def test_embedded_model_answers_in_bf16_on_cuda(threshold):
    """bf16 (what `dfastllm serve` loads on a GPU) keeps the learned families
    right (the model card: 99%, 97% and 100% on the CPU)."""
    tasks = [t for t in tiny_tasks.held_out_set(5) if t.family in ("reverse", "copy", "facts")]
    llm = LLM(DEFAULT_MODEL_DIR, device="cuda", kv_cache="dual")
    assert next(llm.loaded.model.parameters()).dtype == torch.bfloat16
    params = SamplingParams(max_tokens=32, temperature=0.0, threshold=threshold)
    replies = llm.chat([[{"role": "user", "content": t.prompt}] for t in tasks], params)
    assert len(tasks) == 15
    assert [(t.prompt, r.text) for t, r in zip(tasks, replies) if not tiny_tasks.check(t, r.text)] == []
