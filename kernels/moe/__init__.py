"""MoE expert GEMMs: a Triton grouped GEMM over rows sorted by expert, its torch reference, and
the sort that groups (token, slot) pairs by expert."""
from .grouped_gemm import grouped_gemm
from .naive import naive_grouped_gemm, sort_by_expert

__all__ = ["grouped_gemm", "naive_grouped_gemm", "sort_by_expert"]
