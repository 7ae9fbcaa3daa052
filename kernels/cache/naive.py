"""Naive torch reference of ``reshape_and_cache``: scatter by slot with advanced indexing."""
from __future__ import annotations

import torch

__all__ = ["naive_reshape_and_cache"]


def naive_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``cache.view(-1, kv_heads, D)[slot_mapping[t]] = key[t]`` for every ``t`` with a slot
    ``>= 0`` (slot -1 marks a token whose K/V is not cached, e.g. padding)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep].to(value_cache.dtype)
