"""Argument checks shared by the paged attention wrappers."""
from __future__ import annotations

import torch

from ..utils import FLOAT_DTYPES, INDEX_DTYPES, check, check_device, check_tensor, host_values


def check_paged_args(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     window: int | None, sinks: torch.Tensor | None,
                     out: torch.Tensor | None) -> tuple[int, int]:
    """Validate the arguments common to decode and prefill; return (window, group)."""
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    check_device(device)
    _, heads, dim = query.shape
    check_tensor("key_cache", key_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    num_blocks, block_size, kv_heads, kdim = key_cache.shape
    check_tensor("value_cache", value_cache, shape=tuple(key_cache.shape), dtypes=FLOAT_DTYPES,
                 device=device)
    check(kdim == dim, f"query head_dim {dim} != key_cache head_dim {kdim}")
    check(kv_heads > 0 and heads % kv_heads == 0,
          f"query heads ({heads}) must be a multiple of kv_heads ({kv_heads}) (GQA)")
    check(block_size > 0 and block_size & (block_size - 1) == 0,
          f"block_size must be a power of two, got {block_size}")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES, device=device)
    num_reqs = block_tables.shape[0]
    check_tensor("seq_lens", seq_lens, shape=(num_reqs,), dtypes=INDEX_DTYPES, device=device)
    check(isinstance(scale, (int, float)), f"scale must be a number, got {type(scale).__name__}")
    if window is None:
        window = 0
    check(isinstance(window, int) and window >= 0,
          f"window must be None, 0 (no window) or a positive int, got {window!r}")
    if sinks is not None:
        check_tensor("sinks", sinks, shape=(heads,), dtypes=FLOAT_DTYPES, device=device)
    if out is not None:
        check_tensor("out", out, shape=tuple(query.shape), dtypes=FLOAT_DTYPES, device=device)
    lens = host_values(seq_lens)
    if lens is not None and num_reqs:
        check(min(lens) >= 0, f"seq_lens must be >= 0, got {lens}")
        capacity = block_tables.shape[1] * block_size
        check(max(lens) <= capacity, f"seq_lens {max(lens)} exceeds the block table's capacity "
              f"({block_tables.shape[1]} blocks of {block_size})")
    return window, heads // kv_heads


def check_block_refs(block_tables: torch.Tensor, seq_lens: list[int], first_key: list[int],
                     num_blocks: int, block_size: int) -> None:
    """Every block the kernel reads (keys ``first_key[r]:seq_lens[r]``) must be in the cache."""
    tables = block_tables.tolist()
    for r, (lo, ctx) in enumerate(zip(first_key, seq_lens)):
        if ctx <= lo:
            continue
        used = tables[r][lo // block_size: -(-ctx // block_size)]
        bad = [b for b in used if not 0 <= b < num_blocks]
        check(not bad, f"block_tables[{r}] maps context blocks to {bad}, outside the cache's "
              f"{num_blocks} blocks")

