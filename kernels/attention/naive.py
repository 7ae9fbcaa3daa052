"""Naive torch references for paged attention (the ground truth of the Triton kernels).

Semantics (the same as ``opdisagg_rt.ops.paged_attention``): request ``r`` owns query rows
``query_start_loc[r]:query_start_loc[r+1]`` (``n_r`` of them, 0 allowed) which are the last
``n_r`` tokens of a context of ``seq_lens[r]`` tokens whose K/V are already in the caches. Its
``j``-th row sits at position ``p = seq_lens[r] - n_r + j`` and attends key positions ``k`` with
``k <= p`` and, when ``window`` is set, ``k > p - window``. Key ``k`` lives at slot
``block_tables[r, k // block_size] * block_size + k % block_size``. GQA: query head ``h`` reads
kv head ``h // (H // kv_heads)``. ``sinks`` (``[H]``) adds ``exp(sinks[h])`` to the softmax
denominator only (gpt-oss). Softmax and accumulation in float32.
"""
from __future__ import annotations

import torch

__all__ = ["naive_paged_attention", "naive_paged_decode_attention"]


def naive_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float, window: int | None = None,
                          sinks: torch.Tensor | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen attention of ``query`` ``[T, H, D]`` over the paged caches; returns ``out``.

    Rows of ``out`` outside ``query_start_loc[0]:query_start_loc[-1]`` are left as they were
    (zeros when ``out`` is None).
    """
    block_size, kv_heads, dim = key_cache.shape[1:]
    heads = query.shape[1]
    group = heads // kv_heads
    window = window or 0
    if out is None:
        out = torch.zeros_like(query)
    k_flat = key_cache.reshape(-1, kv_heads, dim)
    v_flat = value_cache.reshape(-1, kv_heads, value_cache.shape[-1])
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r in range(len(lens)):
        start, end, ctx = qsl[r], qsl[r + 1], lens[r]
        n = end - start
        if n == 0:
            continue
        pos_q = torch.arange(ctx - n, ctx)
        pos_k = torch.arange(ctx)
        if window > 0:  # keys below the first query's window may be unmapped: do not read them
            pos_k = pos_k[pos_k > ctx - n - window]
        blocks = block_tables[r].long().cpu()[pos_k // block_size]
        slots = (blocks * block_size + pos_k % block_size).to(key_cache.device)
        k = k_flat[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_flat[slots].float().repeat_interleave(group, dim=1)
        q = query[start:end].float()
        scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
        visible = pos_k[None, :] <= pos_q[:, None]
        if window > 0:
            visible &= pos_k[None, :] > pos_q[:, None] - window
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        if sinks is not None:
            sink = sinks.float().reshape(heads, 1, 1).expand(heads, n, 1).to(scores.device)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hnl,lhd->nhd", probs, v).to(out.dtype)
    return out


def naive_paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                                 value_cache: torch.Tensor, block_tables: torch.Tensor,
                                 seq_lens: torch.Tensor, scale: float, window: int | None = None,
                                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query row per request (``query`` ``[N, H, D]``, position ``seq_lens[r] - 1``).
    Requests with ``seq_lens[r] == 0`` (padding) get zeros."""
    n = query.shape[0]
    has = (seq_lens > 0).long().cpu()
    qsl = torch.zeros(n + 1, dtype=torch.long)
    qsl[1:] = torch.cumsum(has, 0)
    # Pack the non-empty requests' rows, run the varlen reference, then unpack.
    rows = has.nonzero().flatten()
    packed = naive_paged_attention(query[rows.to(query.device)], key_cache, value_cache,
                                   block_tables, qsl, seq_lens.cpu(), scale, window, sinks)
    out = torch.zeros_like(query)
    out[rows.to(query.device)] = packed
    return out
