"""Paged decode attention: one query token per request over the paged KV cache.

One program per (request, kv head, split) handles all ``H // kv_heads`` query heads of that kv
head (GQA: K/V are loaded once per group), walking the request's keys in tiles of ``BLOCK_N``
with an online softmax. With ``num_splits > 1`` the key range is split across programs
(flash-decoding) and a second kernel merges the partial results; sinks are applied where the
softmax is finalised. The key range is ``[0, ctx)``, or ``[ctx - window, ctx)`` with a window.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import cdiv, check, check_pow2, dot_precision, host_values, next_pow2
from .common import check_block_refs, check_paged_args

__all__ = ["paged_decode_attention"]

# "No key yet" running max: finite, so exp(m_old - m_new) never sees inf - inf.
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _paged_decode_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, sinks_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    scale, window, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + req).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    hi = ctx
    if NUM_SPLITS > 1:
        per = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * per
        hi = tl.minimum(hi, lo + per)

    g = tl.arange(0, BLOCK_G)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    req64 = req.to(tl.int64)
    q = tl.load(q_ptr + req64 * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * scale

    m_i = tl.full([BLOCK_G], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if USE_SINKS and NUM_SPLITS == 1:
        # The sink is one more logit in the denominator: start the running softmax from it.
        m_i = tl.load(sinks_ptr + heads, mask=g_mask, other=_NEG).to(tl.float32)
        l_i = tl.where(g_mask, 1.0, 0.0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    table = block_tables_ptr + req64 * stride_bt
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_mask = kpos < hi
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        off = (kpos % BLOCK_SIZE).to(tl.int64)
        kv_mask = k_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks
                    + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(k_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs
                    + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + req64 * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        row = (req64 * NUM_HEADS + heads) * NUM_SPLITS + split  # [N, H, S] layout
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _paged_decode_reduce_kernel(
    out_ptr, sinks_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, head_dim,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_SINKS: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    s_mask = sp < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    row = (req * NUM_HEADS + head) * NUM_SPLITS + sp
    m = tl.load(part_m_ptr + row, mask=s_mask, other=_NEG)
    lse = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None],
                  other=0.0)
    m_max = tl.max(m, 0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m_max = tl.maximum(m_max, sink)
    w = tl.exp(m - m_max)
    total = tl.sum(lse * w, 0)
    if USE_SINKS:
        total += tl.exp(sink - m_max)
    o = tl.sum(acc * w[:, None], 0)
    o = o / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + req * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def _auto_splits(query: torch.Tensor, kv_heads: int, max_ctx: int, block_n: int) -> int:
    """Split the keys when there are too few (request, kv head) programs to fill the GPU."""
    if query.device.type != "cuda":
        return 1
    programs = query.shape[0] * kv_heads
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    if programs >= sms or max_ctx <= 4 * block_n:
        return 1
    return int(max(1, min(16, cdiv(sms, programs), cdiv(max_ctx, 4 * block_n))))


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: int | None = None, sinks: torch.Tensor | None = None,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           block_n: int = 64) -> torch.Tensor:
    """Decode attention over the paged KV cache.

    Args:
        query: ``[N, H, D]`` one query row per request (rows may be strided; each head vector
            dense). Float32, float16 or bfloat16.
        key_cache, value_cache: ``[num_blocks, block_size, kv_heads, D]`` (block_size a power
            of two). ``H`` must be a multiple of ``kv_heads``; query head ``h`` reads kv head
            ``h // (H // kv_heads)``.
        block_tables: int32/int64 ``[N, max_blocks]``; key ``k`` of request ``r`` is at slot
            ``block_tables[r, k // block_size] * block_size + k % block_size``.
        seq_lens: int32/int64 ``[N]``, context length including this token (already cached);
            the query sits at position ``seq_lens[r] - 1``. 0 marks a padding row (output 0).
        scale: softmax scale.
        window: None/0 for full attention, else keys ``(p - window, p]`` only.
        sinks: optional ``[H]`` per-head logits added to the softmax denominator (gpt-oss).
        out: optional ``[N, H, D]`` output (any float dtype); allocated like ``query`` if None.
        num_splits: split each request's keys over this many programs (flash-decoding);
            None picks from the GPU's SM count (always 1 off CUDA).
        block_n: keys per tile (power of two >= 16).

    Returns ``out``. Accumulation and softmax in float32.
    """
    window, group = check_paged_args(query, key_cache, value_cache, block_tables, seq_lens,
                                     scale, window, sinks, out)
    num_reqs, heads, dim = query.shape
    check(num_reqs == block_tables.shape[0],
          f"query has {num_reqs} rows but block_tables has {block_tables.shape[0]} requests "
          "(decode: one query row per request)")
    check_pow2("block_n", block_n)
    if num_splits is not None:
        check(isinstance(num_splits, int) and num_splits >= 1,
              f"num_splits must be a positive int, got {num_splits!r}")
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    lens = host_values(seq_lens)
    if lens is not None:
        check_block_refs(block_tables, lens, [max(0, c - window) if window else 0 for c in lens],
                         num_blocks, block_size)
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0 or heads == 0:
        return out
    if num_splits is None:
        num_splits = _auto_splits(query, kv_heads, block_tables.shape[1] * block_size, block_n)

    block_d = max(16, next_pow2(dim))
    block_g = max(16, next_pow2(group))
    if num_splits > 1:
        part_m = torch.empty(num_reqs, heads, num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_reqs, heads, num_splits, block_d, dtype=torch.float32,
                               device=query.device)
    else:
        part_m = part_l = part_acc = out  # unused
    sinks_arg = sinks if sinks is not None else query  # unused when USE_SINKS is False
    _paged_decode_kernel[(num_reqs, kv_heads, num_splits)](
        out, query, key_cache, value_cache, block_tables, seq_lens, sinks_arg,
        part_m, part_l, part_acc,
        float(scale), window, dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=heads, GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, HAS_WINDOW=window > 0, USE_SINKS=sinks is not None,
        PRECISION=dot_precision(query.dtype),
    )
    if num_splits > 1:
        _paged_decode_reduce_kernel[(num_reqs, heads)](
            out, sinks_arg, part_m, part_l, part_acc, dim, out.stride(0), out.stride(1),
            NUM_HEADS=heads, NUM_SPLITS=num_splits, BLOCK_S=max(2, next_pow2(num_splits)),
            BLOCK_D=block_d, USE_SINKS=sinks is not None,
        )
    return out

