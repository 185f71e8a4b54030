"""The cached modes (dual, prefix) over the paged KV pool.

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

import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.engine.batch import build_step
from dfastllm.engine.kv_cache import CanvasRows, PagePool, bytes_per_page
from dfastllm.engine.request import Request
from dfastllm.models.attention import RaggedAttention

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


def _candidate_logits(loaded, requests, canvas, pool, cache_mode):
    batch = build_step(requests, canvas.canvas, cache_mode=cache_mode, logits_shift=loaded.model.logits_shift,
                       page_size=pool.page_size if pool else 0)
    with torch.inference_mode():
        hidden = loaded.model.forward_packed(batch.input_ids, batch.position_ids,
                                             RaggedAttention(batch.attn, pool.cache if pool else None))
        return loaded.model.head(hidden[batch.hidden_index])


def _pool(loaded, num_pages, page_size=4):
    c = loaded.model.config
    return PagePool(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, dtype=torch.float32,
                    device=torch.device("cpu"), page_size=page_size, num_pages=num_pages)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["llada_gqa", "dream"])
@pytest.mark.parametrize("kv_cache", CACHED)
def test_cached_step_logits_equal_full_forward(family, kv_cache, request):
    """Rows of different lengths in different blocks, their pages scattered
    over the pool (small pages, a row's pages out of order): the first step
    of the block (full forward writing the pages) and a cached step over the
    same canvas give the same logits for the block's masked positions, and
    both equal each row's own dense, uncached forward."""
    loaded = request.getfixturevalue(family)
    params = SamplingParams(max_tokens=16, block_length=4, steps=8)
    gen = torch.Generator().manual_seed(5)
    canvas = CanvasRows(rows=4, columns=64, fill_id=loaded.pad_token_id, device=torch.device("cpu"))
    pool = _pool(loaded, num_pages=40)
    pool.allocate(3 * 4)  # a request that left a hole: later pages are not contiguous from page 1
    requests = []
    for i, (n, committed) in enumerate([(7, 0), (3, 6), (12, 9)]):
        r = Request(f"r{i}", prompt(n, start=30 + 9 * i), params, seed=i, mask_id=loaded.mask_token_id,
                    stop_ids=frozenset(), deadline=None, arrival=0.0)
        # Commit the first `committed` tokens (blocks before the current one,
        # and part of it) with random ordinary tokens.
        r.generated[:committed] = torch.randint(20, 300, (committed,), generator=gen).numpy()
        r.block = committed // 4
        r.slot = canvas.allocate(torch.tensor(r.prompt_ids + r.generated.tolist()))
        r.pages = pool.allocate(r.canvas_len)[::-1]  # any order: the block table says where
        requests.append(r)

    full = _candidate_logits(loaded, requests, canvas, pool, kv_cache)
    for r in requests:
        r.needs_full_forward = False
    cached = _candidate_logits(loaded, requests, canvas, pool, kv_cache)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)

    model = loaded.model
    with torch.inference_mode():
        alone = []
        for r in requests:
            ids = canvas.canvas[r.slot, :r.canvas_len][None]
            logits = model.full_logits(model(ids, torch.arange(r.canvas_len)[None]))[0]
            alone.append(logits[torch.from_numpy(r.masked_positions())])
    torch.testing.assert_close(full, torch.cat(alone), rtol=1e-4, atol=1e-4)
    assert full.shape[0] == sum(r.masked_positions().size for r in requests) == 4 + 2 + 3


def test_page_pool_hands_out_and_takes_back():
    pool = PagePool(n_layers=2, n_kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                    page_size=16, num_pages=6)
    assert (pool.capacity, pool.num_free, pool.num_used) == (5, 5, 0)
    a = pool.allocate(17)  # 2 pages
    b = pool.allocate(48)  # 3 pages
    assert len(a) == 2 and len(b) == 3 and 0 not in a + b and len(set(a + b)) == 5
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(1)
    pool.release(a)
    assert pool.num_free == 2 and sorted(pool.allocate(20)) == sorted(a)
    assert pool.cache.k[1].shape == (6, 16, 2, 4) and pool.cache.page_size == 16
    assert bytes_per_page(n_layers=2, n_kv_heads=2, head_dim=4, dtype=torch.bfloat16, page_size=16) == 2 * 2 * 16 * 2 * 4 * 2


def _engine_with_pages(loaded, pages, **kwargs):
    """An engine whose pool holds `pages` pages besides the scratch one."""
    c = loaded.model.config
    page = bytes_per_page(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, dtype=torch.float32,
                          page_size=16)
    core = EngineCore(loaded, kv_cache=kwargs.pop("kv_cache", "dual"), kv_cache_memory=(pages + 1) * page,
                      page_size=16, **kwargs)
    assert core.pool.capacity == pages
    return core


@pytest.mark.timeout(60)
def test_a_request_waits_for_pages_and_one_that_never_fits_is_refused(llada):
    params = SamplingParams(max_tokens=8, block_length=8, steps=2, ignore_eos=True)
    core = _engine_with_pages(llada, 3)
    core.add_request("a", prompt(20), params)  # 28 tokens: 2 pages
    core.add_request("b", prompt(6), params)  # 14 tokens: 1 page
    core.add_request("c", prompt(4), params)  # 1 page: waits for a free one
    core.step()
    assert (core.num_running, core.num_waiting) == (2, 1)
    assert (core.kv_pages_used, core.kv_pages_free) == (3, 0)
    results = run_all(core)
    assert all(out.finish_reason == "length" for _, out in results.values()) and len(results) == 3
    assert (core.kv_pages_used, core.kv_pages_free) == (0, 3)
    with pytest.raises(ValueError, match="KV pages"):
        core.add_request("d", prompt(45), params)  # 53 tokens: 4 pages > 3


@pytest.mark.timeout(60)
def test_pages_return_on_finish_cancel_and_failure(llada, monkeypatch):
    params = SamplingParams(max_tokens=16, block_length=4, steps=16, ignore_eos=True)
    core = _engine_with_pages(llada, 10)
    core.add_request("a", prompt(5), params)  # 21 tokens: 2 pages
    core.add_request("b", prompt(20), params)  # 36 tokens: 3 pages
    core.add_request("c", prompt(9), params)  # 25 tokens: 2 pages
    core.step()
    assert core.kv_pages_used == 7
    b_pages = core.scheduler.live["b"].pages
    assert core.abort("b")  # cancelled mid-batch: its pages are free at once
    assert core.kv_pages_used == 4 and set(b_pages) <= set(core.pool._free)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(llada.model, "forward_packed", out_of_memory)
    outputs = core.step()
    assert {o.request_id: o.finish_reason for o in outputs} == {"a": "error", "c": "error"}
    assert (core.kv_pages_used, core.kv_pages_free) == (0, 10)
    monkeypatch.undo()
    core.add_request("d", prompt(5), params)
    core.step()
    assert core.abort("d") and core.kv_pages_used == 0  # and a deadline-expired one:
    core.add_request("e", prompt(5), params, deadline=0.0)
    assert core.step()[0].finish_reason == "abort" and core.kv_pages_used == 0


@pytest.mark.timeout(60)
def test_a_step_computes_only_its_rows_query_tokens(llada):
    """A long request beside short ones: each cached row costs its block, a
    row at a block start its canvas; nothing is padded to the longest."""
    params = SamplingParams(max_tokens=8, block_length=4, steps=8, ignore_eos=True)
    core = EngineCore(llada, kv_cache="dual", max_batch_size=4)
    core.add_request("long", prompt(100), params)  # 108 tokens
    core.add_request("short", prompt(3), params)  # 11 tokens
    core.step()
    assert core.stats.last_step_query_tokens == 108 + 11 and core.stats.last_step_full_rows == 2
    core.step()
    assert core.stats.last_step_query_tokens == 4 + 4 and core.stats.last_step_full_rows == 0
    core.add_request("late", prompt(20), params)  # 28 tokens, at its block start beside cached rows
    core.step()
    assert core.stats.last_step_query_tokens == 4 + 4 + 28 and core.stats.last_step_full_rows == 1


def test_a_failed_graph_capture_falls_back_to_eager(llada, monkeypatch):
    """If capturing the cached step's CUDA graph fails, every cached step runs
    eagerly on the same bucket-padded inputs and no request fails (the
    capture forced to fail, on the CPU: the padding row and its scratch
    page run through the CPU attention)."""
    from dfastllm.engine.cuda_graphs import CachedStepGraphs

    def capture_fails(self, args, page_size):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(CachedStepGraphs, "_capture", capture_fails)
    core = EngineCore(llada, kv_cache="dual")
    core.graphs = CachedStepGraphs(core.model, core.pool.cache, max_pages=core.max_model_len // core.pool.page_size,
                                   max_seqlen_k=core.max_model_len)
    for rid, ids, params in _mixed():
        core.add_request(rid, ids, params)
    results = run_all(core)
    assert core.graphs.failed and core.graphs.captures == 0
    assert all(out.finish_reason == "length" for _, out in results.values())
    assert _tokens(results) == _tokens(generate(llada, _mixed(), kv_cache="dual"))


def test_graph_buckets():
    from dfastllm.engine.cuda_graphs import round_rows, round_tokens
    assert [round_tokens(n) for n in (1, 64, 65, 1024, 1025)] == [64, 64, 128, 1024, 1280]
    assert [round_rows(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 40]
