"""Paged-KV copy ops of the C++ extension ``opdisagg_rt._C``, and their torch references.

The ops are registered with the torch dispatcher as ``torch.ops.opdisagg.*`` (CPU always, CUDA
when built with a CUDA torch, Meta for torch.compile); the functions here are thin typed calls.
KV layout (DESIGN.md): per layer K and V caches ``[num_blocks, block_size, kv_heads, head_dim]``,
``slot = block * block_size + offset``, slot -1 skipped. Index tensors are int64 on the caches'
device. The ``*_ref`` functions are plain torch indexing, the ground truth in tests.
"""

from __future__ import annotations

import torch

try:
    from opdisagg_rt import _C  # noqa: F401  (loading it registers torch.ops.opdisagg.*)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "opdisagg_rt._C, the C++ extension, is missing or failed to load "
        f"({e}); build it with `pip install --no-build-isolation -e .` from the repo root"
    ) from e

# Bound once: calling an OpOverload directly skips the packet's overload resolution, which costs
# about as much as the copy itself on a decode step (called once per layer).
_ops = torch.ops.opdisagg
_reshape_and_cache = _ops.reshape_and_cache.default
_copy_blocks = _ops.copy_blocks.default
_gather_blocks = _ops.gather_blocks.default
_scatter_blocks = _ops.scatter_blocks.default
_paged_attention = _ops.paged_attention.default

__all__ = [
    "reshape_and_cache", "copy_blocks", "gather_blocks", "scatter_blocks",
    "reshape_and_cache_ref", "copy_blocks_ref", "gather_blocks_ref", "scatter_blocks_ref",
    "paged_attention", "paged_attention_ref",
]


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, kv_heads, head_dim]`` into the caches in place at
    ``slot_mapping[t]`` (int64 ``[num_tokens]``); tokens with slot -1 are skipped."""
    _reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    """For each row ``(src, dst)`` of ``block_mapping`` (int64 ``[n, 2]``), copy block ``src``
    to block ``dst`` in every cache (copy-on-write). Pairs must be independent: no ``dst`` is
    another pair's ``src``."""
    _copy_blocks(key_caches, value_caches, block_mapping)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Return the blocks ``cache[block_ids]`` as one new contiguous tensor
    ``[len(block_ids), *cache.shape[1:]]``."""
    return _gather_blocks(cache, block_ids)


def scatter_blocks(buffer: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Inverse of :func:`gather_blocks`: ``cache[block_ids] = buffer`` in place."""
    _scatter_blocks(buffer, cache, block_ids)



def paged_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    window: int = 0, sinks: torch.Tensor | None = None) -> None:
    """Attention of ``query`` ``[T, H, D]`` over the paged caches, written into ``out``
    ``[T, H, D]`` (same dtype: float32, bfloat16 or float16; float32 accumulation).

    Request ``r`` owns query rows ``query_start_loc[r]:query_start_loc[r+1]`` (``n_r`` of them,
    0 allowed); ``seq_lens[r]`` is its context length including those new tokens, whose K/V
    must already be in the caches. Its ``j``-th row sits at position ``p = seq_lens[r] - n_r + j``
    and attends key positions ``[0, p]``, or ``[max(0, p - window + 1), p]`` when ``window > 0``;
    key ``k`` is read at slot ``block_tables[r, k // block_size] * block_size + k % block_size``.
    GQA: query head ``h`` uses kv head ``h // (H // kv_heads)``. ``sinks`` (float32 ``[H]``) adds
    a per-head logit to the softmax denominator only. Rows of ``out`` outside
    ``query_start_loc[0]:query_start_loc[-1]`` are left untouched. Index tensors are int64;
    ``query``/``out`` rows may be strided but each head vector must be dense.
    """
    _paged_attention(out, query, key_cache, value_cache, block_tables, query_start_loc,
                     seq_lens, scale, window, sinks)

# ---- references: naive torch indexing ------------------------------------------------------

def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep]


def copy_blocks_ref(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                    block_mapping: torch.Tensor) -> None:
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for cache in [*key_caches, *value_caches]:
        cache[dst] = cache[src]


def gather_blocks_ref(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    return cache[block_ids].contiguous()


def scatter_blocks_ref(buffer: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    cache[block_ids] = buffer


def paged_attention_ref(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                        value_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                        window: int = 0, sinks: torch.Tensor | None = None) -> None:
    """Naive :func:`paged_attention`: per request, gather its keys, mask, softmax in float32."""
    block_size, kv_heads, dim = key_cache.shape[1:]
    group = query.shape[1] // kv_heads
    k_flat = key_cache.reshape(-1, kv_heads, dim)
    v_flat = value_cache.reshape(-1, kv_heads, dim)
    for r in range(block_tables.shape[0]):
        start, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
        n, ctx = end - start, int(seq_lens[r])
        if n == 0:
            continue
        k_lo = max(0, ctx - n - window + 1) if window > 0 else 0  # blocks below may be unmapped
        pos_k = torch.arange(k_lo, ctx)
        slots = block_tables[r, pos_k // block_size] * block_size + pos_k % block_size
        k = k_flat[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_flat[slots].float().repeat_interleave(group, dim=1)
        q = query[start:end].float()  # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
        pos_q = torch.arange(ctx - n, ctx)
        visible = pos_k[None, :] <= pos_q[:, None]
        if window > 0:
            visible &= pos_k[None, :] > pos_q[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float()[:, None, None].expand(-1, n, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hnl,lhd->nhd", probs, v).to(out.dtype)
