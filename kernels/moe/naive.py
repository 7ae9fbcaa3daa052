"""Naive torch references for the grouped MoE GEMM, and the token sort it expects."""
from __future__ import annotations

import torch

__all__ = ["naive_grouped_gemm", "sort_by_expert"]


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs of ``topk_ids`` ``[T, k]`` by expert.

    Returns ``order`` (int64 ``[T * k]``: indices into ``topk_ids.flatten()``, expert-major and
    stable, so ``order // k`` is the token of each grouped row) and ``expert_offsets`` (int64
    ``[num_experts + 1]``: expert ``e`` owns grouped rows ``offsets[e]:offsets[e+1]``). Pure
    torch on the ids' device, no host synchronisation.
    """
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def naive_grouped_gemm(x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ weight[e].T (+ bias[e])`` in float32, for grouped rows
    ``expert_offsets[e]:expert_offsets[e+1]``; ``weight`` ``[E, N, K]`` (nn.Linear layout).
    Rows outside ``expert_offsets[0]:expert_offsets[-1]`` are zero."""
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float32, device=x.device)
    offs = expert_offsets.tolist()
    for e in range(weight.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            out[a:b] = x[a:b].float() @ weight[e].float().T
            if bias is not None:
                out[a:b] += bias[e].float()
    return out.to(x.dtype)
