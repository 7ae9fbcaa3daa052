"""Chunked gated delta rule forward (prefill): varlen, initial state in, final state out.

One program per (sequence, value head, block of V columns) scans its sequence chunk by chunk
with ``S[:, v-block]`` (float32) in registers. Per chunk (``G = cumsum(g)`` within the chunk,
``Gam[i, j] = exp(G_i - G_j)`` for ``i >= j``)::

    A = strict_lower((beta K) K^T * Gam);  T = (I + A)^-1   (forward substitution, in registers)
    W = T (beta K exp(G));  U = T (beta V);  V' = U - W S
    O = (Q exp(G)) S + lower(Q K^T * Gam) V'
    S = exp(G_last) S + (K exp(G_last - G))^T V'

``T`` only depends on q/k/g/beta, so each V block recomputes it (cheap next to the dots and
it keeps the kernel to one pass). Chunks start at each sequence's first token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import cdiv, check, check_linear_qkv, check_pow2, check_state, dot_precision, next_pow2
from .common import check_gates

__all__ = ["chunk_gated_delta_rule"]


@triton.jit
def _chunk_gdr_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, cu_seqlens_ptr, h0_ptr, ht_ptr,
    scale, total, dk, dv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_gt, stride_bt, stride_ot, stride_oh,
    HV: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INIT: tl.constexpr,
    STORE_FINAL: tl.constexpr, USE_L2NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    hk = h // GROUP
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + seq).to(tl.int32)
        eos = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int32)
    else:
        bos = 0
        eos = total
    length = eos - bos

    i = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    k_mask = ck < dk
    v_mask = cv < dv
    st_off = (seq.to(tl.int64) * HV + h) * dk * dv + ck[:, None] * dv + cv[None, :]
    st_mask = k_mask[:, None] & v_mask[None, :]
    if HAS_INIT:
        state = tl.load(h0_ptr + st_off, mask=st_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], tl.float32)
    lower = i[:, None] >= i[None, :]
    strict = i[:, None] > i[None, :]
    eye = tl.where(i[:, None] == i[None, :], 1.0, 0.0)

    for c in range(0, tl.cdiv(length, BT)):
        rows = bos + c * BT + i
        n_valid = tl.minimum(length - c * BT, BT)
        r_mask = i < n_valid
        rows64 = rows.to(tl.int64)
        qk_mask = r_mask[:, None] & k_mask[None, :]
        q = tl.load(q_ptr + rows64[:, None] * stride_qt + hk * stride_qh + ck[None, :],
                    mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + rows64[:, None] * stride_kt + hk * stride_kh + ck[None, :],
                    mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows64[:, None] * stride_vt + h * stride_vh + cv[None, :],
                    mask=r_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows64 * stride_gt + h, mask=r_mask, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + rows64 * stride_bt + h, mask=r_mask, other=0.0).to(tl.float32)
        if USE_L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, 1) + 1e-6)[:, None]
            k = k * tl.rsqrt(tl.sum(k * k, 1) + 1e-6)[:, None]
        q = q * scale

        gc = tl.cumsum(g, 0)  # padded rows have g = 0: gc[-1] is the chunk's total decay
        g_last = tl.sum(g, 0)
        gam = tl.exp(tl.where(lower, gc[:, None] - gc[None, :], float("-inf")))
        kb = k * b[:, None]
        a = tl.where(strict, tl.dot(kb, tl.trans(k), input_precision=PRECISION) * gam, 0.0)
        # T = (I + A)^-1 by forward substitution: T[r] = e_r - sum_{j<r} A[r, j] T[j].
        t_inv = eye
        for r in range(1, n_valid):
            a_r = tl.sum(tl.where(i[:, None] == r, a, 0.0), 0)
            row = tl.where(i == r, 1.0, 0.0) - tl.sum(a_r[:, None] * t_inv, 0)
            t_inv = tl.where(i[:, None] == r, row[None, :], t_inv)

        w = tl.dot(t_inv, kb * tl.exp(gc)[:, None], input_precision=PRECISION)
        u = tl.dot(t_inv, v * b[:, None], input_precision=PRECISION)
        v_new = u - tl.dot(w, state, input_precision=PRECISION)
        o = tl.dot(q * tl.exp(gc)[:, None], state, input_precision=PRECISION)
        attn = tl.dot(q, tl.trans(k), input_precision=PRECISION) * gam  # gam is 0 above i == j
        o += tl.dot(attn, v_new, input_precision=PRECISION)
        tl.store(o_ptr + rows64[:, None] * stride_ot + h * stride_oh + cv[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=r_mask[:, None] & v_mask[None, :])
        k_decayed = k * tl.exp(g_last - gc)[:, None]
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k_decayed), v_new,
                                                input_precision=PRECISION)

    if STORE_FINAL:
        tl.store(ht_ptr + st_off, state, mask=st_mask)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, scale: float | None = None,
                           cu_seqlens: torch.Tensor | None = None,
                           initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False,
                           use_qk_l2norm_in_kernel: bool = False, chunk_size: int = 64,
                           block_v: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences, chunked (prefill).

    Args:
        q, k: ``[T, HK, K]``; v: ``[T, HV, V]`` with ``HV`` a multiple of ``HK`` (value head
            ``h`` reads q/k head ``h // (HV // HK)``). Token-flat; float32/float16/bfloat16.
        g: ``[T, HV]`` log decay (``<= 0``; the state is multiplied by ``exp(g_t)``).
        beta: ``[T, HV]`` write strength (usually ``sigmoid(b)``).
        scale: multiplies ``q`` after the optional L2 norm; None means ``K ** -0.5``.
        cu_seqlens: int32/int64 ``[N + 1]`` sequence boundaries; None means one sequence.
        initial_state: ``[N, HV, K, V]`` (read as float32) or None (zeros).
        output_final_state: return the final states ``[N, HV, K, V]`` float32.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head (Qwen3-Next: True).
        chunk_size: tokens per chunk (power of two >= 16); block_v: V columns per program.

    Returns ``(o [T, HV, V] in v's dtype, final_state or None)``; rows of ``o`` outside
    ``cu_seqlens[0]:cu_seqlens[-1]`` are zero.
    """
    total, n, hk, dk, hv, dv = check_linear_qkv(q, k, v, cu_seqlens)
    check_gates(g, beta, total, hv, q.device)
    if scale is None:
        scale = dk ** -0.5
    check(isinstance(scale, (int, float)), f"scale must be a number, got {type(scale).__name__}")
    for name, val in (("chunk_size", chunk_size), ("block_v", block_v)):
        check_pow2(name, val)
    if initial_state is not None:
        check_state("initial_state", initial_state, (n, hv, dk, dv), q.device, float32=False)
    o = (torch.zeros if cu_seqlens is not None else torch.empty)(total, hv, dv, dtype=v.dtype,
                                                                  device=q.device)
    final = (torch.empty(n, hv, dk, dv, dtype=torch.float32, device=q.device)
             if output_final_state else None)
    if n == 0 or hv == 0:
        return o, final
    bv = min(max(16, next_pow2(dv)), block_v)
    _chunk_gdr_fwd_kernel[(n, hv, cdiv(dv, bv))](
        q, k, v, g, beta, o, cu_seqlens if cu_seqlens is not None else o,
        initial_state if initial_state is not None else o, final if final is not None else o,
        float(scale), total, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), o.stride(0), o.stride(1),
        HV=hv, GROUP=hv // hk, BT=chunk_size, BK=max(16, next_pow2(dk)), BV=bv,
        IS_VARLEN=cu_seqlens is not None, HAS_INIT=initial_state is not None,
        STORE_FINAL=final is not None, USE_L2NORM=bool(use_qk_l2norm_in_kernel),
        PRECISION=dot_precision(q.dtype),
    )
    return o, final
