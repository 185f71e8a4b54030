"""Attention over a ragged batch (`dfastllm.models.attention`) against its
plain-torch reference: rows of different query and key lengths, grouped
heads, pages scattered over the pool in any order, fresh random inputs (never
zeros), RoPE at random positions applied by the rope_write_kv kernel (or its
reference) on the way in. The grouped-SDPA path here (the CPU's); the flash
path on a GPU."""

import itertools

import pytest
import torch

from dfastllm.models.attention import (AttentionMetadata, Heads, PagedKVCache, RaggedAttention,
                                       ragged_attention_reference)
from dfastllm.models.layers import rope_cos_sin
from dfastllm.ops import rope_write_kv_reference


def _case(gen, *, heads, kv_heads, head_dim, rows, page_size, paged, dtype, device, uniform=False):
    """Random rows: (query start, query length, canvas length) and their metadata
    (uniform: every row of the first row's shape, the steady state's one group)."""
    shapes = []
    for _ in range(rows):
        length = int(torch.randint(1, 50, (1,), generator=gen))
        if paged:
            start = int(torch.randint(0, length, (1,), generator=gen))
            end = int(torch.randint(start + 1, length + 1, (1,), generator=gen))
        else:  # without a cache a row queries its whole canvas
            start, end = 0, length
        shapes.append((start, end - start, length))
    if uniform:
        shapes = [shapes[0]] * rows
    elif paged:  # two rows of one shape: the grouped path batches them
        shapes.append(shapes[0])
    n_tokens = sum(q for _, q, _ in shapes)
    qkv = torch.randn(n_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    positions = torch.cat([torch.arange(start, start + q_len) for start, q_len, _ in shapes]).to(device)
    cu, pages, slots, tables = [0], [], [], []
    num_pages = 1 + sum(-(-length // page_size) for *_, length in shapes)
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # page 0 stays scratch
    for start, q_len, length in shapes:
        cu.append(cu[-1] + q_len)
        mine = [order.pop() for _ in range(-(-length // page_size))]
        pages.append(mine)
        slots += [mine[p // page_size] * page_size + p % page_size for p in range(start, start + q_len)]
    width = max(len(p) for p in pages)
    tables = [p + [0] * (width - len(p)) for p in pages]
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor([0, *itertools.accumulate(length for *_, length in shapes)], dtype=torch.int32,
                                  device=device),
        seqlens_k=torch.tensor([length for *_, length in shapes], dtype=torch.int32, device=device),
        max_seqlen_q=max(q_len for _, q_len, _ in shapes), max_seqlen_k=max(length for *_, length in shapes),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device) if paged else None,
        slot_mapping=torch.tensor(slots if paged else range(n_tokens), dtype=torch.long, device=device),
        page_size=page_size if paged else 0, host_seqlens_q=[q_len for _, q_len, _ in shapes],
        host_seqlens_k=[length for *_, length in shapes], host_pages=pages if paged else [])
    cache = None
    if paged:  # every key of every row holds random K/V already (earlier steps wrote them)
        shape = (2, num_pages, page_size, kv_heads, head_dim)
        cache = PagedKVCache(kv=[torch.randn(shape, generator=gen).to(device, dtype)])
    return qkv, positions, meta, cache


def _check(device, dtype, paged, page_size, kv_heads, tol, plain_torch=False, uniform=False):
    gen = torch.Generator().manual_seed(page_size * 7 + kv_heads + paged)
    heads = Heads(n_heads=4, n_kv_heads=kv_heads, head_dim=16, rope_in_fp32=True)
    for _ in range(2):  # fresh inputs each round
        qkv, positions, meta, cache = _case(gen, heads=4, kv_heads=kv_heads, head_dim=16, rows=5,
                                            page_size=page_size, paged=paged, dtype=dtype, device=device,
                                            uniform=uniform)
        cos, sin = rope_cos_sin(positions, 16, 10000.0)
        # The rotated q, k (and v) in plain torch, K/V into a scratch page of every token.
        n = qkv.shape[0]
        scratch = torch.empty(2, 1, n, kv_heads, 16, dtype=dtype, device=device)
        q = rope_write_kv_reference(qkv[None], cos[None], sin[None], scratch[0], scratch[1],
                                    torch.arange(n, device=device)[None], n_heads=4, rotate_in_fp32=True)[0]
        k, v = scratch[0, 0], scratch[1, 0]
        ref_pages = (cache.k[0].clone(), cache.v[0].clone()) if paged else (None, None)
        expected = ragged_attention_reference(q, k, v, meta, *ref_pages)
        got = RaggedAttention(meta, cache)(0, qkv, cos, sin, heads, plain_torch=plain_torch)
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        if paged:  # the query tokens' K/V were written where the reference put them
            # k rotated by the kernel: within the kernel's parity bound of the reference (fp32 ULPs)
            torch.testing.assert_close(cache.k[0], ref_pages[0], atol=tol, rtol=tol)
            torch.testing.assert_close(cache.v[0], ref_pages[1], atol=0, rtol=0)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("page_size", [1, 16])
def test_grouped_sdpa_matches_reference(paged, kv_heads, page_size):
    _check(torch.device("cpu"), torch.float32, paged, page_size, kv_heads, 1e-5)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_one_group_of_every_row_matches_reference(paged, kv_heads):
    """All rows of one shape: one SDPA over the whole pack, its output returned in place."""
    _check(torch.device("cpu"), torch.float32, paged, 16, kv_heads, 1e-5, uniform=True)


@pytest.mark.parametrize("paged", [False, True])
def test_plain_torch_rope_matches_reference(paged):
    """Training's path: the rope_write_kv reference instead of the kernel."""
    _check(torch.device("cpu"), torch.float32, paged, 16, 2, 1e-5, plain_torch=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("paged, page_size", [(False, 0), (True, 16), (True, 256)])
def test_cuda_attention_matches_reference(dtype, paged, page_size):
    """bf16: torch's varlen flash attention (pages read in place at 256, gathered at 16);
    fp32: the grouped path on the GPU."""
    _check(torch.device("cuda"), dtype, paged, page_size or 16, 2, 2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_metadata_and_cache_go_together():
    meta = AttentionMetadata(cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32),
                             cu_seqlens_k=torch.tensor([0, 2], dtype=torch.int32),
                             seqlens_k=torch.tensor([2], dtype=torch.int32), max_seqlen_q=2, max_seqlen_k=2)
    cache = PagedKVCache(kv=[torch.randn(2, 2, 4, 1, 8)])
    with pytest.raises(ValueError, match="together"):
        RaggedAttention(meta, cache)
