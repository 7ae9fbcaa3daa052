"""Fused recurrent Lightning attention (decode): the float32 state is updated in place.

One program per (sequence, head, block of V columns) loads ``S[:, v-block]`` from the state
pool, runs ``S = exp(-s) S + k^T v; o = (scale q) S`` over the sequence's tokens (one token per
sequence for decode) and writes ``S`` back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (FLOAT_DTYPES, cdiv, check, check_linear_qkv, check_pow2, check_state,
                     check_state_indices, check_tensor, next_pow2)

__all__ = ["fused_recurrent_lightning_attn"]


@triton.jit
def _fused_recurrent_lightning_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slope_ptr, cu_seqlens_ptr, state_ptr, state_indices_ptr,
    scale, dk, dv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    H: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_INDICES: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
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
    st_ptrs = state_ptr + (idx * H + h) * dk * dv + ck[:, None] * dv + cv[None, :]
    st_mask = k_mask[:, None] & v_mask[None, :]
    state = tl.load(st_ptrs, mask=st_mask, other=0.0)
    decay = tl.exp(-tl.load(slope_ptr + h).to(tl.float32))
    for t in range(bos, eos):
        q = tl.load(q_ptr + t * stride_qt + h * stride_qh + ck, mask=k_mask,
                    other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + ck, mask=k_mask,
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + cv, mask=v_mask,
                    other=0.0).to(tl.float32)
        state = state * decay + k[:, None] * v[None, :]
        o = tl.sum(state * (q * scale)[:, None], 0)
        tl.store(o_ptr + t * stride_ot + h * stride_oh + cv, o.to(o_ptr.dtype.element_ty),
                 mask=v_mask)
    tl.store(st_ptrs, state, mask=st_mask)


def fused_recurrent_lightning_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   slope: torch.Tensor, state: torch.Tensor, scale: float = 1.0,
                                   cu_seqlens: torch.Tensor | None = None,
                                   state_indices: torch.Tensor | None = None,
                                   out: torch.Tensor | None = None,
                                   block_v: int = 64) -> torch.Tensor:
    """Recurrent Lightning attention with the state updated in place (decode).

    Args:
        q, k: ``[T, H, K]``; v: ``[T, H, V]`` token-flat.
        slope: ``[H]`` per-head decay rates (decay ``exp(-slope)`` per token).
        state: float32 ``[S, H, K, V]`` contiguous state pool, updated in place.
        scale: multiplies ``q`` (MiniMax: 1.0).
        cu_seqlens: int ``[N + 1]``; None means one token per sequence (decode: ``N = T``).
        state_indices: int ``[N]``, sequence ``n`` uses ``state[state_indices[n]]``; a negative
            index marks padding (zero output, no state touched). None: sequence ``n`` uses
            ``state[n]``.
        out: optional ``[T, H, V]`` output.

    Returns ``out`` (``v``'s dtype if allocated here).
    """
    total, n, hk, dk, hv, dv = check_linear_qkv(q, k, v, cu_seqlens)
    if cu_seqlens is None:
        n = total
    check(hk == hv, f"lightning attention needs as many v heads as q/k heads, got {hv} and {hk}")
    check_tensor("slope", slope, shape=(hk,), dtypes=FLOAT_DTYPES, device=q.device)
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
    _fused_recurrent_lightning_kernel[(n, hv, cdiv(dv, bv))](
        q, k, v, out, slope, cu_seqlens if cu_seqlens is not None else out, state,
        state_indices if state_indices is not None else out,
        float(scale), dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        H=hv, BK=max(16, next_pow2(dk)), BV=bv,
        IS_VARLEN=cu_seqlens is not None, HAS_INDICES=state_indices is not None,
    )
    return out

