"""Paged attention kernels: decode (one query per request, optional split-K) and varlen prefill
over a paged KV cache with a cached prefix; GQA, optional sliding window and sinks."""
from .decode import paged_decode_attention
from .naive import naive_paged_attention, naive_paged_decode_attention
from .prefill import paged_prefill_attention

__all__ = ["paged_decode_attention", "paged_prefill_attention", "naive_paged_attention",
           "naive_paged_decode_attention"]
