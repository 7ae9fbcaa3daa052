"""Varlen (prefill / chunked-prefill / mixed) attention over the paged KV cache.

Request ``r``'s query rows are the last ``n_r`` tokens of its ``seq_lens[r]``-token context, so
a cached prefix (prefix-cache hit, earlier chunk of a chunked prefill) is attended through the
block table like the new tokens, whose K/V must already be written (``reshape_and_cache``).

One program per (request, tile of query tokens, kv head). GQA packs the ``G = H // kv_heads``
query heads of the kv head into the tile's rows (row ``m`` is token ``m // G``, head
``m % G``), so each K/V tile is loaded once for the whole group. Keys are walked in tiles of
``BLOCK_N`` from the tile's lowest visible key (0, or ``first_pos - window + 1``) to its last
query position, with an online softmax in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (INDEX_DTYPES, cdiv, check, check_pow2, check_tensor, dot_precision,
                     host_values, next_pow2)
from .common import check_block_refs, check_paged_args

__all__ = ["paged_prefill_attention"]

_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _paged_prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr,
    seq_lens_ptr, sinks_ptr,
    scale, window, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    qb = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req).to(tl.int32)
    n = tl.load(query_start_loc_ptr + req + 1).to(tl.int32) - q_start
    if qb * BLOCK_Q >= n:
        return
    ctx = tl.load(seq_lens_ptr + req).to(tl.int32)

    m = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + m // GROUP
    heads = kvh * GROUP + m % GROUP
    row_mask = (m < BLOCK_Q * GROUP) & (tok < n)
    qpos = ctx - n + tok
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    rows64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * scale

    first_q = ctx - n + qb * BLOCK_Q
    hi = tl.minimum(first_q + BLOCK_Q, ctx)  # one past the tile's last query position
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_q - window + 1, 0)

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if USE_SINKS:
        m_i = tl.load(sinks_ptr + heads, mask=row_mask, other=_NEG).to(tl.float32)
        l_i = tl.where(row_mask, 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_mask = kpos < hi
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        off = (kpos % BLOCK_SIZE).to(tl.int64)
        kv_mask = k_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks
                    + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = k_mask[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            visible = visible & (kpos[None, :] > qpos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs
                    + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows64[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            window: int | None = None, sinks: torch.Tensor | None = None,
                            out: torch.Tensor | None = None, max_query_len: int | None = None,
                            block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Varlen causal attention of ``query`` over the paged KV cache (prefill with a cached
    prefix; decode rows, ``n_r == 1``, work too).

    Args:
        query: ``[T, H, D]`` (rows may be strided; each head vector dense).
        key_cache, value_cache: ``[num_blocks, block_size, kv_heads, D]``.
        block_tables: int32/int64 ``[N, max_blocks]``.
        query_start_loc: int32/int64 ``[N + 1]`` (cu_seqlens_q); request ``r`` owns rows
            ``query_start_loc[r]:query_start_loc[r+1]`` (``n_r``, 0 allowed).
        seq_lens: int32/int64 ``[N]``, context length including the ``n_r`` new tokens
            (``>= n_r``); row ``j`` sits at position ``seq_lens[r] - n_r + j``.
        scale: softmax scale. window: None/0 (full) or a window: keys ``(p - window, p]``.
        sinks: optional ``[H]`` per-head denominator logits (gpt-oss).
        out: optional ``[T, H, D]``; rows outside ``query_start_loc[0]:query_start_loc[-1]``
            are left untouched (allocated with ``torch.empty_like(query)`` if None).
        max_query_len: the largest ``n_r`` (sizes the grid); computed from ``query_start_loc``
            (a device sync on CUDA) when None.
        block_m: query rows (tokens x group heads) per program; block_n: keys per tile.

    Returns ``out``. Accumulation and softmax in float32.
    """
    window, group = check_paged_args(query, key_cache, value_cache, block_tables, seq_lens,
                                     scale, window, sinks, out)
    num_reqs = block_tables.shape[0]
    check_tensor("query_start_loc", query_start_loc, shape=(num_reqs + 1,), dtypes=INDEX_DTYPES,
                 device=query.device)
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        check_pow2(name, val)
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    total, heads, dim = query.shape
    qsl, lens = host_values(query_start_loc), host_values(seq_lens)
    if qsl is not None:
        check(all(b >= a for a, b in zip(qsl, qsl[1:])) and qsl[0] >= 0 and qsl[-1] <= total,
              f"query_start_loc must be non-decreasing within [0, {total}], got {qsl}")
        ns = [b - a for a, b in zip(qsl, qsl[1:])]
        if lens is not None:
            bad = [r for r, (n, c) in enumerate(zip(ns, lens)) if n > c]
            check(not bad, f"seq_lens must be >= the request's query rows; requests {bad} have "
                  f"{[ns[r] for r in bad]} rows but seq_lens {[lens[r] for r in bad]}")
            first = [max(0, c - n - window + 1) if window else 0 for n, c in zip(ns, lens)]
            check_block_refs(block_tables, lens, first, num_blocks, block_size)
        if max_query_len is not None and ns:
            check(max_query_len >= max(ns), f"max_query_len={max_query_len} is below the "
                  f"largest request's {max(ns)} query rows")
    if out is None:
        out = torch.empty_like(query)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if num_reqs else 0
    if num_reqs == 0 or max_query_len <= 0 or heads == 0:
        return out

    block_m = max(block_m, next_pow2(group))
    block_q = block_m // group
    grid = (num_reqs, cdiv(max_query_len, block_q), kv_heads)
    _paged_prefill_kernel[grid](
        out, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
        sinks if sinks is not None else query,
        float(scale), window, dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_D=max(16, next_pow2(dim)), BLOCK_N=block_n,
        HAS_WINDOW=window > 0, USE_SINKS=sinks is not None, PRECISION=dot_precision(query.dtype),
    )
    return out
