"""Grouped MoE GEMM (Triton, interpreted) against the naive reference.

Tolerances: float32 inputs atol = rtol = 1e-5 (K = 40, float32 sums in another order);
bfloat16 inputs atol = rtol = 2e-2 (same bf16 inputs in the reference, bf16 output).
"""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.kernels.moe import grouped_gemm, naive_grouped_gemm, sort_by_expert

E, K, N = 5, 40, 20


def test_sort_by_expert():
    ids = torch.tensor([[1, 3], [3, 4], [1, 0], [3, 3]])
    order, offsets = sort_by_expert(ids, E)
    assert offsets.tolist() == [0, 1, 3, 3, 7, 8]  # expert 2 has no rows
    grouped = ids.flatten()[order]
    assert grouped.tolist() == sorted(ids.flatten().tolist())
    assert (order // 2)[1:3].tolist() == [0, 2]  # stable: token order kept within an expert


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_naive(dtype, assert_close):
    ids = torch.randint(0, E, (11, 2))
    ids[ids == 2] = 3  # an empty expert
    order, offsets = sort_by_expert(ids, E)
    x = torch.randn(22, K).to(dtype)
    w_kn = torch.randn(E, K, N).to(dtype)  # stored [E, K, N] (gpt-oss): pass the transpose
    bias = torch.randn(E, N).to(dtype)
    for weight, b in ((w_kn.transpose(1, 2), bias), (w_kn.transpose(1, 2).contiguous(), None)):
        out = grouped_gemm(x, weight, offsets, b, block_m=16, block_n=16, block_k=16)
        assert out.dtype == dtype
        assert_close(out, naive_grouped_gemm(x, weight, offsets, b), dtype)


def test_partial_rows_and_empty():
    offsets = torch.tensor([2, 2, 9, 9, 9, 12], dtype=torch.int32)  # rows 0-1 and 12-13: none
    x = torch.randn(14, K)
    weight = torch.randn(E, N, K)
    out = torch.full((14, N), 7.0)
    grouped_gemm(x, weight, offsets, out=out, block_m=16, block_n=16, block_k=16)
    ref = naive_grouped_gemm(x, weight, offsets)
    torch.testing.assert_close(out[2:12], ref[2:12], atol=1e-5, rtol=1e-5)
    assert (out[:2] == 7).all() and (out[12:] == 7).all()
    empty = grouped_gemm(torch.empty(0, K), weight, torch.zeros(E + 1, dtype=torch.int64))
    assert empty.shape == (0, N)


def test_argument_errors():
    x = torch.randn(4, K)
    weight = torch.randn(E, N, K)
    offsets = torch.tensor([0, 1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match="features"):
        grouped_gemm(torch.randn(4, K + 1), weight, offsets)
    with pytest.raises(ValueError, match="expert_offsets must have shape"):
        grouped_gemm(x, weight, offsets[:-1])
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_gemm(x, weight, torch.tensor([0, 3, 2, 3, 4, 4]))
    with pytest.raises(ValueError, match="bias must have shape"):
        grouped_gemm(x, weight, offsets, bias=torch.zeros(E, N + 1))
