"""Paged decode and varlen prefill attention (Triton, interpreted) against the naive reference.

Tolerances (see conftest.assert_close): float32 inputs atol = rtol = 1e-5; bfloat16 inputs
atol = rtol = 2e-2 against the reference on the same bf16 inputs (output rounded to bf16).
Block-table entries the kernels must not read (blocks below a sliding window, unused table
columns) point at a poison block of NaNs, so any such read turns the output into NaN.
"""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.kernels import backend
from opdisagg_rt.kernels.attention import (naive_paged_attention, naive_paged_decode_attention,
                                           paged_decode_attention, paged_prefill_attention)

BS = 4  # cache block size: contexts below cross block boundaries and end on one (8)


def make_cache(lens: list[int], first_key: list[int], kv_heads: int, dim: int,
               dtype: torch.dtype, block_size: int = BS):
    """Random caches with each request's blocks at shuffled block ids. Blocks wholly below
    ``first_key[r]`` and unused table columns map to the poison block 0 (NaN)."""
    need = [-(-n // block_size) for n in lens]
    cols = max(need, default=0) + 1
    total = sum(need) + 1
    ids = (torch.randperm(total - 1) + 1).tolist()
    tables = torch.zeros(len(lens), cols, dtype=torch.int32)
    for r, nb in enumerate(need):
        for b in range(nb):
            block = ids.pop()
            if (b + 1) * block_size > first_key[r]:
                tables[r, b] = block
    k_cache = torch.randn(total, block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(total, block_size, kv_heads, dim).to(dtype)
    k_cache[0] = float("nan")
    v_cache[0] = float("nan")
    return k_cache, v_cache, tables


DECODE_LENS = [1, 8, 0, 13, 5]  # one token, a block boundary, padding, partial blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3, 100])  # 100: window larger than every context
@pytest.mark.parametrize("use_sinks", [False, True])
def test_decode_matches_naive(dtype, window, use_sinks, assert_close):
    heads, kv_heads, dim = 6, 2, 24
    lens = DECODE_LENS
    first = [max(0, c - window) if window else 0 for c in lens]
    k_cache, v_cache, tables = make_cache(lens, first, kv_heads, dim, dtype)
    seq_lens = torch.tensor(lens)
    q = torch.randn(len(lens), heads, dim).to(dtype)
    sinks = torch.randn(heads) if use_sinks else None
    ref = naive_paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3, window, sinks)
    assert not ref.isnan().any()
    for splits in (1, 3):  # 3: flash-decoding split of the keys + reduce kernel
        out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3, window=window,
                                     sinks=sinks, num_splits=splits, block_n=16)
        assert out.dtype == dtype
        assert_close(out, ref, dtype)
        assert (out[2] == 0).all()  # seq_len 0: a padding row


def test_decode_mha_wide_group_and_strided_query(assert_close):
    # kv_heads == heads (no GQA), then a group of 8 (BLOCK_G padding), a strided query view.
    lens = [3, 17, 16]
    for heads, kv_heads in ((4, 4), (8, 1)):
        k_cache, v_cache, tables = make_cache(lens, [0] * 3, kv_heads, 16, torch.float32)
        qkv = torch.randn(3, heads + 2 * kv_heads, 16)
        q = qkv[:, :heads]
        out = paged_decode_attention(q, k_cache, v_cache, tables.long(), torch.tensor(lens), 0.25)
        ref = naive_paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), 0.25)
        assert_close(out, ref, torch.float32)


def test_decode_empty_batch():
    k_cache, v_cache, _ = make_cache([4], [0], 2, 16, torch.float32)
    q = torch.empty(0, 4, 16)
    out = paged_decode_attention(q, k_cache, v_cache, torch.empty(0, 3, dtype=torch.int32),
                                 torch.empty(0, dtype=torch.int32), 1.0)
    assert out.shape == (0, 4, 16)


# (new rows n, context ctx): a fresh prefill, a cached prefix across blocks, a request with no
# rows this step, a decode row, a long one (several query tiles and key tiles).
PREFILL = [(5, 5), (3, 11), (0, 7), (1, 9), (17, 20)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_prefill_matches_naive(dtype, window, use_sinks, assert_close):
    heads, kv_heads, dim = 6, 2, 24  # group 3: 5 tokens x 3 heads fill 15 of 16 tile rows
    ns = [n for n, _ in PREFILL]
    lens = [c for _, c in PREFILL]
    first = [max(0, c - n - window + 1) if window else 0 for n, c in PREFILL]
    k_cache, v_cache, tables = make_cache(lens, first, kv_heads, dim, dtype)
    pad = 2  # rows outside query_start_loc[0]:query_start_loc[-1] must stay untouched
    qsl = torch.tensor([pad] + [pad + sum(ns[: r + 1]) for r in range(len(ns))])
    total = pad + sum(ns) + 2
    q = torch.randn(total, heads, dim).to(dtype)
    sinks = torch.randn(heads) if use_sinks else None
    out = torch.full_like(q, 7.0)
    paged_prefill_attention(q, k_cache, v_cache, tables, qsl, torch.tensor(lens), 0.3,
                            window=window, sinks=sinks, out=out, block_m=16, block_n=16)
    ref = naive_paged_attention(q, k_cache, v_cache, tables, qsl, torch.tensor(lens), 0.3,
                                window, sinks, out=torch.full_like(q, 7.0))
    assert not ref.isnan().any()
    assert_close(out, ref, dtype)
    assert (out[:pad] == 7).all() and (out[-2:] == 7).all()


def test_prefill_equals_decode_for_single_rows(assert_close):
    lens = [6, 9, 4]
    k_cache, v_cache, tables = make_cache(lens, [0] * 3, 2, 16, torch.float32)
    q = torch.randn(3, 4, 16)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(4, dtype=torch.int32)
    a = paged_prefill_attention(q, k_cache, v_cache, tables, qsl, seq_lens, 0.5, window=5,
                                max_query_len=1)
    b = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.5, window=5)
    assert_close(a, b, torch.float32)


def test_prefill_empty():
    k_cache, v_cache, tables = make_cache([4], [0], 2, 16, torch.float32)
    q = torch.empty(0, 4, 16)
    out = paged_prefill_attention(q, k_cache, v_cache, tables[:0],
                                  torch.zeros(1, dtype=torch.int32),
                                  torch.empty(0, dtype=torch.int32), 1.0)
    assert out.shape == (0, 4, 16)
    # Requests that all have zero rows this step.
    out = paged_prefill_attention(torch.empty(0, 4, 16), k_cache, v_cache, tables,
                                  torch.zeros(2, dtype=torch.int32), torch.tensor([4]), 1.0)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("window,use_sinks", [(None, False), (3, True)])
def test_naive_matches_runtime_reference(window, use_sinks, ops_module):
    """Anchor: the naive reference agrees with opdisagg_rt.ops.paged_attention_ref (the CPU
    path's ground truth), including window and sinks."""
    ns = [n for n, _ in PREFILL]
    lens = [c for _, c in PREFILL]
    k_cache, v_cache, tables = make_cache(lens, [0] * len(lens), 2, 16, torch.float32)
    qsl = torch.tensor([0] + [sum(ns[: r + 1]) for r in range(len(ns))])
    q = torch.randn(sum(ns), 4, 16)
    sinks = torch.randn(4) if use_sinks else None
    ref = torch.zeros_like(q)
    ops_module.paged_attention_ref(ref, q, k_cache, v_cache, tables.long(), qsl, torch.tensor(lens),
                            0.3, window or 0, sinks)
    ours = naive_paged_attention(q, k_cache, v_cache, tables, qsl, torch.tensor(lens), 0.3,
                                 window, sinks)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_naive_window_matches_sdpa():
    """Anchor: a windowed causal prefill with no cached prefix equals SDPA with the same mask."""
    n, heads, dim, window = 11, 4, 16, 4
    k_cache, v_cache, tables = make_cache([n], [0], 2, dim, torch.float32)
    q = torch.randn(n, heads, dim)
    ours = naive_paged_attention(q, k_cache, v_cache, tables, torch.tensor([0, n]),
                                 torch.tensor([n]), 0.25, window)
    slots = tables[0].long()[torch.arange(n) // BS] * BS + torch.arange(n) % BS
    k = k_cache.view(-1, 2, dim)[slots].repeat_interleave(2, dim=1)
    v = v_cache.view(-1, 2, dim)[slots].repeat_interleave(2, dim=1)
    i = torch.arange(n)
    mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(ours, ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_argument_errors(monkeypatch):
    k_cache, v_cache, tables = make_cache([5, 3], [0, 0], 2, 16, torch.float32)
    seq_lens = torch.tensor([5, 3])
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_decode_attention(torch.randn(2, 3, 16), k_cache, v_cache, tables, seq_lens, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(2, 4, 8), k_cache, v_cache, tables, seq_lens, 1.0)
    with pytest.raises(ValueError, match="block_tables must have dtype"):
        paged_decode_attention(q, k_cache, v_cache, tables.float(), seq_lens, 1.0)
    with pytest.raises(ValueError, match="window"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 1.0, window=-1)
    with pytest.raises(ValueError, match="sinks"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 1.0, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="capacity"):
        paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([5, 99]), 1.0)
    bad = tables.clone()
    bad[1, 0] = 1000
    with pytest.raises(ValueError, match="outside the cache"):
        paged_decode_attention(q, k_cache, v_cache, bad, seq_lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens must be >="):
        paged_prefill_attention(torch.randn(9, 4, 16), k_cache, v_cache, tables,
                                torch.tensor([0, 6, 9]), seq_lens, 1.0)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(torch.randn(5, 4, 16), k_cache, v_cache, tables,
                                torch.tensor([0, 4, 5]), seq_lens, 1.0, max_query_len=2)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q, k_cache[:, :3], v_cache[:, :3], tables, torch.tensor([2, 2]), 1.0)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        paged_decode_attention(None, k_cache, v_cache, tables, seq_lens, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.interpreter_enabled()
    with pytest.raises(ValueError, match="need CUDA tensors"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 1.0)
