"""Prefix caching across LLaDA2 requests: pages of finished blocks are shared,
copy-free and counted by reference, keyed by the tokens they depend on; a
second chat turn computes only its new blocks; outputs are the same with
the cache on and off; the pool frees a page only when nobody holds it and
keeps a bounded LRU of unreferenced cached pages."""

import pytest
import torch

from dfastllm import SamplingParams
from dfastllm.engine import EngineCore
from dfastllm.engine.kv_cache import PagePool
from dfastllm.models import load_model
from dfastllm.testing import write_tiny_llada2

from .conftest import prompt

pytestmark = pytest.mark.timeout(120)

BLOCK = 4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(write_tiny_llada2(tmp_path_factory.mktemp("llada2_prefix"), seed=5, head_scale=12.0))


def engine(loaded, page_size=BLOCK, **kwargs):
    return EngineCore(loaded, page_size=page_size, **kwargs)


def generate(core, rid, ids, params):
    """-> (answer tokens, query tokens of the request's first step)."""
    core.add_request(rid, ids, params)
    tokens, first_step = [], None
    while core.has_unfinished():
        outputs = core.step()
        if first_step is None:
            first_step = core.stats.last_step_query_tokens
        for o in outputs:
            tokens += o.new_token_ids
    return tokens, first_step


@pytest.mark.parametrize("page_size", [BLOCK, 2, 8])  # pages as blocks, several per block, blocks per page
def test_second_chat_turn_computes_only_its_new_blocks(loaded, page_size):
    params = SamplingParams(max_tokens=8, block_length=BLOCK, threshold=0.5, ignore_eos=True)
    turn1 = prompt(8)
    outputs = {}
    for prefix_caching in (True, False):
        core = engine(loaded, page_size, prefix_caching=prefix_caching)
        answer1, first1 = generate(core, "turn1", turn1, params)
        assert first1 == 12  # the prompt's two blocks and the first answer block
        turn2 = turn1 + answer1 + prompt(5, start=70)  # 21 tokens: blocks 0..4 whole, then one token
        answer2, first2 = generate(core, "turn2", turn2, params)
        outputs[prefix_caching] = (answer1, answer2)
        if prefix_caching:
            # Turn 1's blocks 0..2 were final (computed from their final tokens); its
            # last block never was (the request ended at its last commit), so turn 2
            # computes that block, its own prompt block and its first answer block.
            # (Pages of 8 hold two blocks: the second page's K/V depends on turn 1's last block.)
            cached = 12 if page_size <= BLOCK else 8
            assert first2 == 24 - cached
            assert core.stats.prefix_cache_hits == cached
            # Looked up: the pages within turn 1's two prompt blocks, then turn 2's five.
            assert core.stats.prefix_cache_queries == 8 + 20 - (4 if page_size == 8 else 0)
        else:
            assert first2 == 24
            assert core.stats.prefix_cache_queries == 0
    assert outputs[True] == outputs[False]


def test_shared_system_prompt_is_computed_once(loaded):
    """Requests with a common system prompt running together share its
    pages; each one's answer is what it is alone without the cache."""
    system = prompt(12, start=40)
    requests = {f"r{i}": (system + prompt(3 + i, start=100 + 10 * i),
                          SamplingParams(max_tokens=6, block_length=BLOCK, threshold=0.6, seed=i))
                for i in range(3)}
    core = engine(loaded)
    generate(core, "warm", system + prompt(2, start=200), SamplingParams(max_tokens=4, block_length=BLOCK))
    for rid, (ids, params) in requests.items():
        core.add_request(rid, ids, params)
    results = {rid: [] for rid in requests}
    outputs = core.step()
    # Each request's first step starts after the system prompt's 3 blocks.
    assert core.stats.last_step_query_tokens == sum((len(ids) // BLOCK + 1) * BLOCK - 12
                                                    for ids, _ in requests.values())
    shared = {tuple(core.scheduler.live[rid].pages[:3]) for rid in requests}
    assert len(shared) == 1  # the same three pages, held by all three
    while outputs or core.has_unfinished():
        for o in outputs:
            results[o.request_id] += o.new_token_ids
        outputs = core.step() if core.has_unfinished() else []
    for rid, (ids, params) in requests.items():
        alone, _ = generate(engine(loaded, prefix_caching=False), rid, ids, params)
        assert results[rid] == alone, rid


def pool(num_pages=6, max_cached_pages=None):
    return PagePool(n_layers=1, n_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"),
                    page_size=4, num_pages=num_pages, max_cached_pages=max_cached_pages)


def test_pages_are_shared_by_reference_and_freed_when_nobody_holds_them():
    p = pool()
    a, hits = p.allocate_prefix(12, [b"k0", b"k1"])
    assert hits == 0 and len(a) == 3
    p.register(a[0], b"k0")
    p.register(a[1], b"k1")
    b, hits = p.allocate_prefix(12, [b"k0", b"k1", b"k2"])
    assert hits == 2 and b[:2] == a[:2] and b[2] != a[2]  # shared, copy-free; the rest fresh
    assert p.num_free == 5 - 4
    p.release(a)
    assert p.num_free == 5 - 3  # a's own page only: the shared ones are still held by b
    p.release(b)
    assert p.num_free == 5  # all free again, two of them still cached
    c, hits = p.allocate_prefix(8, [b"k0", b"k1"])
    assert hits == 2 and c == a[:2]  # the cached pages serve a later hit


def test_unreferenced_cached_pages_are_a_bounded_lru():
    p = pool(num_pages=6, max_cached_pages=2)
    held = [p.allocate_prefix(4, [])[0][0] for _ in range(3)]
    for i, page in enumerate(held):
        p.register(page, b"k%d" % i)
    for page in held:
        p.release([page])
    assert p.num_cached == 2 and p.allocate_prefix(4, [b"k0"])[1] == 0  # k0, released first, was dropped
    # Once the free list runs out, the cached pages are taken, least recently released first.
    taken, _ = p.allocate_prefix(4 * p.num_free, [])
    assert taken[-2:] == held[1:] and p.num_cached == 0


def test_a_registered_key_keeps_its_page():
    p = pool()
    first, second = p.allocate(4), p.allocate(4)
    p.register(first[0], b"k")
    p.register(second[0], b"k")  # the same K/V computed by two requests at once: the second stays private
    p.release(second)
    assert p.num_cached == 1 and p.allocate_prefix(4, [b"k"])[0] == first
