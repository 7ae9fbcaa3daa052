"""Attention over the paged KV cache with torch ops: the CPU path of `layers.{i}.attn`.

Decode rows (one query each) go to the C++ paged-attention kernel, which reads the blocks in
place; each prefill runs torch's SDPA (blocked matmuls win for many query rows), straight on the
new K/V when nothing is cached before it, else over its gathered blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdisagg_rt import ops
from opdisagg_rt.step_batch import StepBatch


def _prefill_mask(q_pos: torch.Tensor, ctx: int, window: int | None) -> torch.Tensor:
    key_pos = torch.arange(ctx)
    mask = key_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > q_pos[:, None] - window
    return mask


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
                    scale: float, window: int | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's rows, already written to the cache);
    caches: [num_blocks, block_size, KVH, D]. Returns [T, H, D]."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    bs = batch.block_size
    nd = batch.num_decodes
    if nd:
        # Decodes: the C++ kernel reads K/V straight from the paged cache (no gather).
        qsl, lens, tables = batch.cached("decode_meta", lambda: (
            batch.query_start_loc[: nd + 1], batch.seq_lens[:nd], batch.block_tables[:nd]))
        ops.paged_attention(out, q, k_cache, v_cache, tables, qsl, lens, scale, window or 0)
    starts = batch.query_start_loc.tolist() if batch.num_reqs > nd else ()
    for r in range(nd, batch.num_reqs):
        s, e, ctx = starts[r], starts[r + 1], batch.seq_lens_list[r]
        n = e - s
        qr = q[s:e].transpose(0, 1).unsqueeze(0)
        if ctx == n and (window is None or window >= n):
            kr, vr, mask, causal = k[s:e], v[s:e], None, True
        else:
            ids = batch.block_tables[r, : -(-ctx // bs)]
            kr = k_cache.index_select(0, ids).view(-1, kv_heads, head_dim)[:ctx]
            vr = v_cache.index_select(0, ids).view(-1, kv_heads, head_dim)[:ctx]
            mask, causal = _prefill_mask(batch.positions[s:e], ctx, window), False
        o = F.scaled_dot_product_attention(qr, kr.transpose(0, 1).unsqueeze(0), vr.transpose(0, 1).unsqueeze(0),
                                           attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out
