"""Chunked Lightning attention forward (prefill): varlen, initial state in, final state out.

One program per (sequence, head, block of V columns) scans its sequence chunk by chunk with the
state block ``S[:, v-block]`` (float32) in registers. Per chunk of ``L <= BT`` tokens at
in-chunk positions ``i, j``::

    o = (Q * exp(-s (i + 1))) S  +  ((Q K^T) * D) V,      D[i, j] = exp(-s (i - j)), i >= j
    S = exp(-s L) S + (K * exp(-s (L - 1 - j)))^T V

Chunks start at each sequence's first token (``cu_seqlens``), so a chunk never straddles two
sequences; the last chunk of a sequence may be partial.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (FLOAT_DTYPES, cdiv, check, check_linear_qkv, check_pow2, check_state,
                     check_tensor, dot_precision, next_pow2)

__all__ = ["chunk_lightning_attn"]


@triton.jit
def _chunk_lightning_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slope_ptr, cu_seqlens_ptr, h0_ptr, ht_ptr,
    scale, total, dk, dv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    H: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + seq).to(tl.int32)
        eos = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int32)
    else:
        bos = 0
        eos = total
    length = eos - bos
    s = tl.load(slope_ptr + h).to(tl.float32)

    i = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    k_mask = ck < dk
    v_mask = cv < dv
    st_off = (seq.to(tl.int64) * H + h) * dk * dv + ck[:, None] * dv + cv[None, :]
    st_mask = k_mask[:, None] & v_mask[None, :]
    if HAS_INIT:
        state = tl.load(h0_ptr + st_off, mask=st_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], tl.float32)

    # In-chunk decays (the same for every chunk).
    q_decay = tl.exp(-s * (i + 1).to(tl.float32))
    diff = (i[:, None] - i[None, :]).to(tl.float32)
    diag = tl.exp(tl.where(diff >= 0, -s * diff, float("-inf")))

    for c in range(0, tl.cdiv(length, BT)):
        rows = bos + c * BT + i
        n_valid = tl.minimum(length - c * BT, BT)
        r_mask = i < n_valid
        rows64 = rows.to(tl.int64)
        q = tl.load(q_ptr + rows64[:, None] * stride_qt + h * stride_qh + ck[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32) * scale
        k = tl.load(k_ptr + rows64[:, None] * stride_kt + h * stride_kh + ck[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows64[:, None] * stride_vt + h * stride_vh + cv[None, :],
                    mask=r_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)
        o = tl.dot(q * q_decay[:, None], state, input_precision=PRECISION)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * diag
        o += tl.dot(qk, v, input_precision=PRECISION)
        tl.store(o_ptr + rows64[:, None] * stride_ot + h * stride_oh + cv[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=r_mask[:, None] & v_mask[None, :])
        k_decay = tl.exp(tl.where(r_mask, -s * (n_valid - 1 - i).to(tl.float32), float("-inf")))
        state = state * tl.exp(-s * n_valid.to(tl.float32)) \
            + tl.dot(tl.trans(k * k_decay[:, None]), v, input_precision=PRECISION)

    if STORE_FINAL:
        tl.store(ht_ptr + st_off, state, mask=st_mask)


def chunk_lightning_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                         scale: float = 1.0, cu_seqlens: torch.Tensor | None = None,
                         initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False, chunk_size: int = 64,
                         block_v: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning (MiniMax) decayed linear attention over whole sequences, chunked.

    Args:
        q, k: ``[T, H, K]``; v: ``[T, H, V]`` (token-flat; float32/float16/bfloat16; rows may
            be strided, each head vector dense).
        slope: ``[H]`` positive per-head decay rates; the state decays by ``exp(-slope)`` per
            token (MiniMax's ``slope_rate``).
        scale: multiplies ``q`` (MiniMax: 1.0).
        cu_seqlens: int32/int64 ``[N + 1]`` sequence boundaries; None means one sequence.
        initial_state: ``[N, H, K, V]`` (any float dtype, read as float32) or None (zeros).
        output_final_state: return the final states ``[N, H, K, V]`` float32.
        chunk_size: tokens per chunk (power of two >= 16); block_v: V columns per program.

    Returns ``(o [T, H, V] in v's dtype, final_state or None)``. Rows outside
    ``cu_seqlens[0]:cu_seqlens[-1]`` of ``o`` are zero.
    """
    total, n, hk, dk, hv, dv = check_linear_qkv(q, k, v, cu_seqlens)
    check(hk == hv, f"lightning attention needs as many v heads as q/k heads, got {hv} and {hk}")
    check_tensor("slope", slope, shape=(hk,), dtypes=FLOAT_DTYPES, device=q.device)
    check(isinstance(scale, (int, float)), f"scale must be a number, got {type(scale).__name__}")
    for name, val in (("chunk_size", chunk_size), ("block_v", block_v)):
        check_pow2(name, val)
    if initial_state is not None:
        check_state("initial_state", initial_state, (n, hk, dk, dv), q.device, float32=False)
    o = (torch.zeros if cu_seqlens is not None else torch.empty)(total, hv, dv, dtype=v.dtype,
                                                                  device=q.device)
    final = (torch.empty(n, hv, dk, dv, dtype=torch.float32, device=q.device)
             if output_final_state else None)
    if n == 0 or hv == 0:
        return o, final
    bv = min(max(16, next_pow2(dv)), block_v)
    _chunk_lightning_fwd_kernel[(n, hv, cdiv(dv, bv))](
        q, k, v, o, slope, cu_seqlens if cu_seqlens is not None else o,
        initial_state if initial_state is not None else o, final if final is not None else o,
        float(scale), total, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1),
        H=hv, BT=chunk_size, BK=max(16, next_pow2(dk)), BV=bv,
        IS_VARLEN=cu_seqlens is not None, HAS_INIT=initial_state is not None,
        STORE_FINAL=final is not None,
        PRECISION=dot_precision(q.dtype),
    )
    return o, final
