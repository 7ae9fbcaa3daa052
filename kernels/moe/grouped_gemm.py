"""Grouped GEMM for MoE experts: rows grouped by expert, one GEMM per expert in one launch.

The rows of ``x`` are already sorted by expert (see :func:`sort_by_expert`); expert ``e`` owns
rows ``expert_offsets[e]:expert_offsets[e+1]`` and multiplies them by ``weight[e].T``. The grid
enumerates row tiles of all experts: a small device-side prefix sum of the per-expert tile
counts (no host synchronisation) lets each program find its expert by binary search; the grid
is sized by the upper bound ``cdiv(M, BLOCK_M) + E`` tiles and surplus programs exit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (FLOAT_DTYPES, INDEX_DTYPES, cdiv, check, check_device, check_pow2,
                     check_tensor, dot_precision, host_values)

__all__ = ["grouped_gemm"]


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, offsets_ptr, tile_start_ptr,
    n_out, k_in,
    stride_xm, stride_we, stride_wn, stride_wk, stride_be, stride_om,
    E: tl.constexpr, LOG_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(tile_start_ptr + E):
        return
    # Binary search: the expert e with tile_start[e] <= pid_m < tile_start[e + 1].
    lo = 0
    hi = E
    for _ in range(LOG_E):
        mid = (lo + hi) // 2
        go_right = tl.load(tile_start_ptr + mid + 1) <= pid_m
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    e = lo
    row_end = tl.load(offsets_ptr + e + 1)
    row0 = tl.load(offsets_ptr + e) + (pid_m - tl.load(tile_start_ptr + e)) * BLOCK_M
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    r_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = cols < n_out
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < k_in
        a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_base + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e.to(tl.int64) * stride_be + cols, mask=c_mask,
                       other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None] & c_mask[None, :])


def grouped_gemm(x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor,
                 bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 block_m: int = 64, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ weight[e].T (+ bias[e])`` for every expert ``e``.

    Args:
        x: ``[M, K]`` rows grouped by expert (rows may be strided; each row dense).
        weight: ``[E, N, K]`` (nn.Linear layout). Any strides: pass ``w.transpose(1, 2)`` for
            weights stored ``[E, K, N]`` (gpt-oss).
        expert_offsets: int32/int64 ``[E + 1]`` non-decreasing; expert ``e`` owns rows
            ``expert_offsets[e]:expert_offsets[e+1]`` (empty experts allowed).
        bias: optional ``[E, N]``.
        out: optional ``[M, N]``; rows outside ``expert_offsets[0]:expert_offsets[-1]`` are not
            written. Allocated (zeros) in ``x``'s dtype if None.

    Float32 accumulation. Returns ``out``.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    device = x.device
    check_device(device)
    check_tensor("weight", weight, ndim=3, dtypes=FLOAT_DTYPES, device=device,
                 last_dim_contiguous=False)
    num_experts, n_out, k_in = weight.shape
    check(x.shape[1] == k_in, f"x has {x.shape[1]} features but weight expects K = {k_in}")
    check_tensor("expert_offsets", expert_offsets, shape=(num_experts + 1,), dtypes=INDEX_DTYPES,
                 device=device)
    if bias is not None:
        check_tensor("bias", bias, shape=(num_experts, n_out), dtypes=FLOAT_DTYPES, device=device)
    if out is None:
        out = torch.zeros(x.shape[0], n_out, dtype=x.dtype, device=device)
    else:
        check_tensor("out", out, shape=(x.shape[0], n_out), dtypes=FLOAT_DTYPES, device=device)
    for name, val in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_pow2(name, val)
    offs = host_values(expert_offsets)
    if offs is not None:
        ordered = all(b >= a for a, b in zip(offs, offs[1:]))
        check(offs[0] >= 0 and offs[-1] <= x.shape[0] and ordered,
              f"expert_offsets must be non-decreasing within [0, {x.shape[0]}], got {offs}")
    if x.shape[0] == 0 or num_experts == 0 or n_out == 0:
        return out
    offsets64 = expert_offsets.to(torch.int64)
    tiles = torch.div(offsets64[1:] - offsets64[:-1] + block_m - 1, block_m, rounding_mode="floor")
    tile_start = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    tile_start[1:] = torch.cumsum(tiles, 0)
    grid = (cdiv(x.shape[0], block_m) + num_experts, cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        x, weight, bias if bias is not None else x, out, offsets64, tile_start,
        n_out, k_in,
        x.stride(0), weight.stride(0), weight.stride(1), weight.stride(2),
        bias.stride(0) if bias is not None else 0, out.stride(0),
        E=num_experts, LOG_E=max(1, (num_experts - 1).bit_length()) + 1, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        PRECISION=dot_precision(x.dtype),
    )
    return out
