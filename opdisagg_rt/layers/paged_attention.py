"""Attention over the paged KV cache with torch ops: the CPU path of `layers.{i}.attn`.

Decode rows (one query each) go to the C++ paged-attention kernel, which reads the blocks in
place; each prefill runs torch's SDPA (blocked matmuls win for many query rows), straight on the
new K/V when nothing is cached before it, else over the blocks it can see (from the window's
first block on, so blocks that fell out of a sliding window may be unmapped). Attention sinks
(one float32 logit per head in each softmax denominator) scale a prefill's SDPA output by
sigmoid(logsumexp - sink), with the log-sum-exp returned by torch's CPU flash kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdisagg_rt import ops
from opdisagg_rt.step_batch import StepBatch


def _prefill_mask(q_pos: torch.Tensor, ctx: int, window: int | None, k_lo: int = 0) -> torch.Tensor:
    key_pos = torch.arange(k_lo, ctx)
    mask = key_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > q_pos[:, None] - window
    return mask


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """q [1, H, n, D], k/v [1, KVH, L, D] -> [1, H, n, D] with a sink logit per head: the softmax
    over [scores, sink] is softmax(scores) * sum / (sum + e^sink) = out * sigmoid(lse - sink)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the flash kernel has no GQA: expand K/V (a prefill-only copy)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    float_mask = None
    if mask is not None:
        float_mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = _flash_cpu(q, k, v, 0.0, causal, attn_mask=float_mask, scale=scale)
    keep = torch.sigmoid(lse - sinks.view(1, -1, 1))  # [1, H, n] float32
    return (out.float() * keep.unsqueeze(-1)).to(q.dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
                    scale: float, window: int | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's rows, already written to the cache);
    caches: [num_blocks, block_size, KVH, D]; sinks: float32 [H] or None. Returns [T, H, D]."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    bs = batch.block_size
    nd = batch.num_decodes
    if nd:
        # Decodes: the C++ kernel reads K/V straight from the paged cache (no gather).
        qsl, lens, tables = batch.cached("decode_meta", lambda: (
            batch.query_start_loc[: nd + 1], batch.seq_lens[:nd], batch.block_tables[:nd]))
        ops.paged_attention(out, q, k_cache, v_cache, tables, qsl, lens, scale, window or 0, sinks)
    starts = batch.query_start_loc.tolist() if batch.num_reqs > nd else ()
    for r in range(nd, batch.num_reqs):
        s, e, ctx = starts[r], starts[r + 1], batch.seq_lens_list[r]
        n = e - s
        qr = q[s:e].transpose(0, 1).unsqueeze(0)
        if ctx == n and (window is None or window >= n):
            kr, vr, mask, causal = k[s:e], v[s:e], None, True
        else:
            # keys before the first query's window are never read: start at the window's block
            first = 0 if window is None else max(0, ctx - n - window + 1) // bs
            ids = batch.block_tables[r, first: -(-ctx // bs)]
            k_lo = first * bs
            kr = k_cache.index_select(0, ids).view(-1, kv_heads, head_dim)[:ctx - k_lo]
            vr = v_cache.index_select(0, ids).view(-1, kv_heads, head_dim)[:ctx - k_lo]
            mask, causal = _prefill_mask(batch.positions[s:e], ctx, window, k_lo), False
        kr, vr = kr.transpose(0, 1).unsqueeze(0), vr.transpose(0, 1).unsqueeze(0)
        if sinks is not None:
            o = _sdpa_with_sinks(qr, kr, vr, mask, causal, scale, sinks)
        else:
            o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, is_causal=causal, scale=scale,
                                               enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out
