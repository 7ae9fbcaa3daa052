"""Triton ``reshape_and_cache``: write this step's K/V rows into the paged caches.

KV layout (DESIGN.md): per layer K and V caches ``[num_blocks, block_size, kv_heads, head_dim]``,
``slot = block * block_size + offset``; tokens whose slot is negative (-1) are skipped. One
program per token copies its ``kv_heads x head_dim`` K and V values (cast to the cache dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (FLOAT_DTYPES, INDEX_DTYPES, check, check_device, check_tensor, host_values,
                     next_pow2)

__all__ = ["reshape_and_cache"]


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    kv_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < kv_heads) & (d[None, :] < head_dim)
    k = tl.load(key_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(key_cache_ptr + blk * stride_kcb + off * stride_kcs + h[:, None] * stride_kch
             + d[None, :], k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(value_cache_ptr + blk * stride_vcb + off * stride_vcs + h[:, None] * stride_vch
             + d[None, :], v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[T, kv_heads, D]`` into ``key_cache``/``value_cache``
    ``[num_blocks, block_size, kv_heads, D]`` in place at ``slot_mapping[t]`` (int32/int64
    ``[T]``); tokens with a negative slot (-1) are skipped. Rows of ``key``/``value`` may be strided
    (e.g. views of a fused QKV output); each head vector must be dense. Values are cast to the
    cache dtype. Slots must be distinct (duplicate slots race on a GPU).
    """
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    device = key.device
    check_device(device)
    check_tensor("value", value, shape=tuple(key.shape), dtypes=FLOAT_DTYPES, device=device)
    check_tensor("key_cache", key_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("value_cache", value_cache, shape=tuple(key_cache.shape), dtypes=FLOAT_DTYPES,
                 device=device)
    num_blocks, block_size, kv_heads, dim = key_cache.shape
    check(tuple(key.shape[1:]) == (kv_heads, dim),
          f"key rows are {tuple(key.shape[1:])} but the cache holds (kv_heads, head_dim) = "
          f"{(kv_heads, dim)}")
    check_tensor("slot_mapping", slot_mapping, shape=(key.shape[0],), dtypes=INDEX_DTYPES,
                 device=device)
    slots = host_values(slot_mapping)
    if slots:
        top = num_blocks * block_size
        bad = [s for s in slots if s >= top]
        check(not bad, f"slot_mapping has slots {bad[:8]} beyond the cache's {top} slots "
              f"({num_blocks} blocks of {block_size})")
    if key.shape[0] == 0 or key.numel() == 0:
        return
    _reshape_and_cache_kernel[(key.shape[0],)](
        key, value, key_cache, value_cache, slot_mapping, kv_heads, dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        BLOCK_SIZE=block_size, BLOCK_H=next_pow2(kv_heads), BLOCK_D=next_pow2(dim),
    )
