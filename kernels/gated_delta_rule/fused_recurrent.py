"""Fused recurrent gated delta rule (decode): the float32 state is updated in place.

One program per (sequence, value head, block of V columns) loads ``S[:, v-block]`` (all of K:
the delta rule reads ``k^T S`` per column) from the state pool, runs the recurrence over the
sequence's tokens (one per sequence for decode) and writes ``S`` back::

    S = exp(g) S;  S += k (beta (v - k^T S))^T;  o = q^T S
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (FLOAT_DTYPES, cdiv, check, check_linear_qkv, check_pow2, check_state,
                     check_state_indices, check_tensor, next_pow2)
from .common import check_gates

__all__ = ["fused_recurrent_gated_delta_rule"]


@triton.jit
def _fused_recurrent_gdr_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, cu_seqlens_ptr, state_ptr, state_indices_ptr,
    scale, dk, dv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_gt, stride_bt, stride_ot, stride_oh,
    HV: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_INDICES: tl.constexpr, USE_L2NORM: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    hk = h // GROUP
    if IS_VARLEN:
        bos = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        eos = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    else:
        bos = seq.to(tl.int64)
        eos = bos + 1
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    k_mask = ck < dk
    v_mask = cv < dv
    if HAS_INDICES:
        idx = tl.load(state_indices_ptr + seq).to(tl.int64)
    else:
        idx = seq.to(tl.int64)
    if idx < 0:  # no state slot (padding): zero output, nothing written
        for t in range(bos, eos):
            tl.store(o_ptr + t * stride_ot + h * stride_oh + cv,
                     tl.zeros([BV], tl.float32).to(o_ptr.dtype.element_ty), mask=v_mask)
        return
    st_ptrs = state_ptr + (idx * HV + h) * dk * dv + ck[:, None] * dv + cv[None, :]
    st_mask = k_mask[:, None] & v_mask[None, :]
    state = tl.load(st_ptrs, mask=st_mask, other=0.0)
    for t in range(bos, eos):
        q = tl.load(q_ptr + t * stride_qt + hk * stride_qh + ck, mask=k_mask,
                    other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * stride_kt + hk * stride_kh + ck, mask=k_mask,
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + cv, mask=v_mask,
                    other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * stride_gt + h).to(tl.float32)
        b = tl.load(beta_ptr + t * stride_bt + h).to(tl.float32)
        if USE_L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6)
            k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
        q = q * scale
        state = state * tl.exp(g)
        delta = (v - tl.sum(state * k[:, None], 0)) * b
        state = state + k[:, None] * delta[None, :]
        o = tl.sum(state * q[:, None], 0)
        tl.store(o_ptr + t * stride_ot + h * stride_oh + cv, o.to(o_ptr.dtype.element_ty),
                 mask=v_mask)
    tl.store(st_ptrs, state, mask=st_mask)


def fused_recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                                     scale: float | None = None,
                                     cu_seqlens: torch.Tensor | None = None,
                                     state_indices: torch.Tensor | None = None,
                                     use_qk_l2norm_in_kernel: bool = False,
                                     out: torch.Tensor | None = None,
                                     block_v: int = 64) -> torch.Tensor:
    """Recurrent gated delta rule with the state updated in place (decode).

    Args:
        q, k: ``[T, HK, K]``; v: ``[T, HV, V]`` (``HV`` a multiple of ``HK``), token-flat.
        g: ``[T, HV]`` log decay; beta: ``[T, HV]`` write strength.
        state: float32 ``[S, HV, K, V]`` contiguous state pool, updated in place.
        scale: multiplies ``q`` after the optional L2 norm; None means ``K ** -0.5``.
        cu_seqlens: int ``[N + 1]``; None means one token per sequence (decode: ``N = T``).
        state_indices: int ``[N]``; sequence ``n`` uses ``state[state_indices[n]]``, a negative
            index marks padding (zero output, no state touched). None: ``state[n]``.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head (Qwen3-Next: True).
        out: optional ``[T, HV, V]`` output.

    Returns ``out`` (``v``'s dtype if allocated here).
    """
    total, n, hk, dk, hv, dv = check_linear_qkv(q, k, v, cu_seqlens)
    if cu_seqlens is None:
        n = total
    check_gates(g, beta, total, hv, q.device)
    if scale is None:
        scale = dk ** -0.5
    check(isinstance(scale, (int, float)), f"scale must be a number, got {type(scale).__name__}")
    check_state("state", state, (None, hv, dk, dv), q.device)
    check_state_indices(state_indices, n, state.shape[0], q.device)
    if out is None:
        out = (torch.zeros if cu_seqlens is not None else torch.empty)(total, hv, dv, dtype=v.dtype,
                                                                        device=q.device)
    else:
        check_tensor("out", out, shape=(total, hv, dv), dtypes=FLOAT_DTYPES, device=q.device)
    if n == 0 or hv == 0:
        return out
    check_pow2("block_v", block_v)
    bv = min(max(16, next_pow2(dv)), block_v)
    _fused_recurrent_gdr_kernel[(n, hv, cdiv(dv, bv))](
        q, k, v, g, beta, out, cu_seqlens if cu_seqlens is not None else out, state,
        state_indices if state_indices is not None else out,
        float(scale), dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), out.stride(0), out.stride(1),
        HV=hv, GROUP=hv // hk, BK=max(16, next_pow2(dk)), BV=bv,
        IS_VARLEN=cu_seqlens is not None, HAS_INDICES=state_indices is not None,
        USE_L2NORM=bool(use_qk_l2norm_in_kernel),
    )
    return out
