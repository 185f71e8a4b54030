"""The cached modes (dual, prefix).

Accuracy relation: a cached step reuses K/V computed at the block's first
step, while kv_cache="none" recomputes them every step, so on a random tiny
model the tokens may differ from "none" (that is the approximation of
Fast-dLLM's caches, not a bug). What must hold, and is tested here:
  * every mask gets filled and the request ends normally;
  * a cached step over an unchanged canvas gives the full forward's logits
    (the cache holds exactly what a full forward would compute);
  * with one step per block every step is a block's first (a full forward),
    so the outputs equal "none" exactly;
  * with one block, dual and prefix recompute the same span: equal outputs.
Even a "confident" random checkpoint (large head) is not enough to ask for
equality with "none" in general: its predictions still move with the
context, which the cached K/V of the prompt do not follow within a block.
"""

import numpy as np
import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.engine.batch import build_step
from dfastllm.engine.kv_cache import BatchBuffers
from dfastllm.engine.request import Request

from .conftest import generate, prompt, run_all

CACHED = ["dual", "prefix"]


def _mixed(max_tokens=16, block_length=4, steps=8):
    params = SamplingParams(max_tokens=max_tokens, block_length=block_length, steps=steps, ignore_eos=True)
    # "d" ends with a shorter block (max_tokens not a multiple of block_length).
    short_last = SamplingParams(max_tokens=max_tokens - 2, block_length=min(block_length, max_tokens - 2),
                                steps=steps, ignore_eos=True)
    return [("a", prompt(5), params), ("b", prompt(12, start=80), params), ("c", prompt(2, start=33), params),
            ("d", prompt(7, start=140), short_last)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kv_cache", CACHED)
def test_cached_modes_fill_every_mask(family, kv_cache, request):
    loaded = request.getfixturevalue(family)
    results = generate(loaded, _mixed(), kv_cache=kv_cache)
    for rid, ids, params in _mixed():
        tokens, out = results[rid]
        assert len(tokens) == params.max_tokens and loaded.mask_token_id not in tokens, rid
        assert out.finish_reason == "length" and out.num_steps == 8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("kv_cache", CACHED)
def test_one_step_per_block_is_exact(family, kv_cache, request):
    loaded = request.getfixturevalue(family)
    requests = _mixed(max_tokens=16, block_length=4, steps=4)
    assert generate(loaded, requests, kv_cache=kv_cache) == generate(loaded, requests, kv_cache="none")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_block_dual_equals_prefix(family, request):
    """With one block, dual's recomputed span (the block) and prefix's (the
    block and all after it) are the same positions, through different query
    ranges: the outputs must agree exactly."""
    loaded = request.getfixturevalue(family)
    requests = _mixed(max_tokens=16, block_length=16, steps=8)
    assert _tokens(generate(loaded, requests, kv_cache="dual")) == \
        _tokens(generate(loaded, requests, kv_cache="prefix"))


def _tokens(results):
    return {rid: tokens for rid, (tokens, _) in results.items()}


def _candidate_logits(loaded, requests, buffers, cache_mode):
    batch = build_step(requests, buffers.canvas, cache_mode=cache_mode, logits_shift=loaded.model.logits_shift)
    kv = buffers.cache_view(batch.rows, batch.cache_columns) if cache_mode != "none" else None
    with torch.inference_mode():
        hidden = loaded.model(batch.input_ids, batch.position_ids, batch.attn_mask, kv, batch.cache_positions)
        return loaded.model.head(hidden.reshape(-1, hidden.shape[-1])[batch.hidden_index])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["llada_gqa", "dream"])
@pytest.mark.parametrize("kv_cache", CACHED)
def test_cached_step_logits_equal_full_forward(family, kv_cache, request):
    """Rows of different lengths in different blocks: the first step of the
    block (full forward writing the cache) and a cached step over the same
    canvas give the same logits for the block's masked positions, and both
    equal each row's own unpadded, uncached forward."""
    loaded = request.getfixturevalue(family)
    params = SamplingParams(max_tokens=16, block_length=4, steps=8)
    gen = torch.Generator().manual_seed(5)
    requests = []
    for i, (n, committed) in enumerate([(7, 0), (3, 6), (12, 9)]):
        r = Request(f"r{i}", prompt(n, start=30 + 9 * i), params, seed=i, mask_id=loaded.mask_token_id,
                    stop_ids=frozenset(), deadline=None, arrival=0.0)
        # Commit the first `committed` tokens (blocks before the current one,
        # and part of it) with random ordinary tokens.
        r.generated[:committed] = torch.randint(20, 300, (committed,), generator=gen).numpy()
        r.block = committed // 4
        r.slot = i
        requests.append(r)
    config = loaded.model.config
    buffers = BatchBuffers(n_layers=config.n_layers, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                           dtype=torch.float32, device=torch.device("cpu"), with_cache=True, max_rows=8,
                           max_columns=64, fill_id=loaded.pad_token_id)
    buffers.ensure(len(requests), max(r.canvas_len for r in requests), 0)
    for r in requests:
        buffers.load_row(r.slot, torch.tensor(r.prompt_ids + r.generated.tolist()))

    full = _candidate_logits(loaded, requests, buffers, kv_cache)
    for r in requests:
        r.needs_full_forward = False
    cached = _candidate_logits(loaded, requests, buffers, kv_cache)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)

    alone = torch.cat([_candidate_logits(loaded, [r], _single_row(buffers, r), "none") for r in requests])
    torch.testing.assert_close(full, alone, rtol=1e-4, atol=1e-4)
    assert full.shape[0] == sum(r.masked_positions().size for r in requests) == 4 + 2 + 3


def _single_row(buffers, r):
    """A cache-less copy of one request's row, as if it ran alone."""
    single = BatchBuffers(n_layers=1, n_kv_heads=1, head_dim=1, dtype=torch.float32, device=torch.device("cpu"),
                          with_cache=False, max_rows=1, max_columns=r.canvas_len, fill_id=0)
    single.ensure(1, r.canvas_len, 0)
    single.canvas[0, :] = buffers.canvas[r.slot, :r.canvas_len]
    r.slot = 0
    return single


def test_compaction_moves_canvas_and_cache_rows():
    buffers = BatchBuffers(n_layers=2, n_kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                           with_cache=True, max_rows=8, max_columns=256, fill_id=0)
    buffers.ensure(3, 10, 0)
    for row in range(3):
        buffers.load_row(row, torch.arange(10) + 100 * row)
        for t in buffers.k + buffers.v:
            t[row].normal_()
    k2 = buffers.k[1][2].clone()
    buffers.move_rows([2], [0], [True])
    assert torch.equal(buffers.canvas[0, :10], torch.arange(10) + 200)
    assert torch.equal(buffers.k[1][0], k2)
    # Growing keeps the live rows (canvas and cache) and zero-fills the rest.
    buffers.ensure(6, 100, live_rows=2)
    assert buffers.rows >= 6 and buffers.columns >= 100
    assert torch.equal(buffers.canvas[0, :10], torch.arange(10) + 200)
    assert torch.equal(buffers.k[1][0, :, :k2.shape[1] - 1], k2[:, :-1])
    assert not buffers.k[0][3:].any() and np.isfinite(buffers.v[0].numpy()).all()


def test_a_failed_graph_capture_falls_back_to_eager(llada, monkeypatch):
    """If capturing the cached step's CUDA graph fails, every cached step runs
    eagerly and no request fails (the capture forced to fail, on the CPU)."""
    from dfastllm.engine import EngineCore
    from dfastllm.engine.cuda_graphs import CachedStepGraphs

    def capture_fails(self, args, kv_cache):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(CachedStepGraphs, "_capture", capture_fails)
    core = EngineCore(llada, kv_cache="dual")
    core.graphs = CachedStepGraphs(core.model)
    for rid, ids, params in _mixed():
        core.add_request(rid, ids, params)
    results = run_all(core)
    assert core.graphs.failed and core.graphs.captures == 0
    assert all(out.finish_reason == "length" for _, out in results.values())
    assert _tokens(results) == _tokens(generate(llada, _mixed(), kv_cache="dual"))


def test_cache_view_follows_the_longest_canvas_not_the_capacity(llada):
    """After one long request grew the buffers, later steps still attend over
    the longest running canvas (rounded up to a 64-column bucket, scratch
    column included), not the whole capacity."""
    params = SamplingParams(max_tokens=16, block_length=4, steps=8)
    r = Request("short", prompt(54), params, seed=0, mask_id=llada.mask_token_id, stop_ids=frozenset(),
                deadline=None, arrival=0.0)
    r.slot = 0
    config = llada.model.config
    buffers = BatchBuffers(n_layers=config.n_layers, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                           dtype=torch.float32, device=torch.device("cpu"), with_cache=True, max_rows=8,
                           max_columns=512, fill_id=llada.pad_token_id)
    buffers.ensure(1, 500, 0)  # a long request was here before
    buffers.load_row(0, torch.tensor(r.prompt_ids + r.generated.tolist()))
    batch = build_step([r], buffers.canvas, cache_mode="dual", logits_shift=0)
    assert r.canvas_len == 70 and buffers.columns == 512
    assert batch.cache_columns == 128 and batch.attn_mask.shape[-1] == 128
    assert batch.cache_positions.max().item() <= 127
