"""Triton reshape_and_cache (interpreted) against the naive reference: exact equality for a
copy; one bf16 ulp (rtol 2^-7) when float32 rows are cast into a bf16 cache, because triton's
interpreter truncates float32 -> bfloat16 where torch (and the GPU) round to nearest."""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.kernels.cache import naive_reshape_and_cache, reshape_and_cache


def _caches(num_blocks, block_size, kv_heads, dim, dtype):
    k = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    return k, torch.randn_like(k)


@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_matches_naive(src_dtype, cache_dtype, slot_dtype):
    kv_heads, dim, block_size = 3, 20, 4
    # Strided K/V rows: views into a fused QKV output [T, 2 + 2 * kv_heads, dim].
    qkv = torch.randn(9, 2 + 2 * kv_heads, dim).to(src_dtype)
    key, value = qkv[:, 2:2 + kv_heads], qkv[:, 2 + kv_heads:]
    # -1 (skipped) at both ends and in the middle; slots on block boundaries (3, 4, 23).
    slots = torch.tensor([-1, 3, 4, 17, -1, 23, 0, 9, -1], dtype=slot_dtype)
    k_cache, v_cache = _caches(6, block_size, kv_heads, dim, cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    naive_reshape_and_cache(key, value, k_ref, v_ref, slots)
    if src_dtype == cache_dtype:
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    else:
        torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=2 ** -7)
        torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=2 ** -7)
    untouched = torch.ones(6 * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    flat = k_cache.view(-1, kv_heads, dim)
    assert torch.equal(flat[untouched], k_ref.view(-1, kv_heads, dim)[untouched])


def test_matches_runtime_reference(ops_module):
    """Anchor: the same result as opdisagg_rt.ops.reshape_and_cache_ref."""
    key, value = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([7, -1, 0, 12, 5])
    k_cache, v_cache = _caches(4, 4, 2, 16, torch.float32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    ops_module.reshape_and_cache_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_empty_and_all_skipped():
    k_cache, v_cache = _caches(2, 4, 2, 16, torch.float32)
    before = k_cache.clone(), v_cache.clone()
    reshape_and_cache(torch.empty(0, 2, 16), torch.empty(0, 2, 16), k_cache, v_cache,
                      torch.empty(0, dtype=torch.int64))
    reshape_and_cache(torch.randn(3, 2, 16), torch.randn(3, 2, 16), k_cache, v_cache,
                      torch.full((3,), -1))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_argument_errors():
    k_cache, v_cache = _caches(2, 4, 2, 16, torch.float32)
    key = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="beyond the cache"):
        reshape_and_cache(key, key, k_cache, v_cache, torch.tensor([0, 8, 1]))
    with pytest.raises(ValueError, match="kv_heads, head_dim"):
        reshape_and_cache(torch.randn(3, 4, 8), torch.randn(3, 4, 8), k_cache, v_cache,
                          torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slot_mapping must have shape"):
        reshape_and_cache(key, key, k_cache, v_cache, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="value must have shape"):
        reshape_and_cache(key, key[:2], k_cache, v_cache, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        reshape_and_cache(key, key, k_cache, v_cache, torch.tensor([0.0, 1.0, 2.0]))
