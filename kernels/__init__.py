"""Triton kernels of opdisagg_rt (the GPU path) with their naive torch references.

Installed as ``opdisagg_rt.kernels``. One folder per kernel family, in the style of
flash-linear-attention: ``naive.py`` holds the torch reference, the other modules the Triton
kernels and their typed, validating wrappers.

    attention/         paged decode attention (GQA, window, sinks, split-K) and varlen
                       prefill attention over a paged KV cache with a cached prefix
    cache/             reshape_and_cache (slot -1 skipped)
    lightning_attn/    MiniMax Lightning attention: chunked prefill, fused recurrent decode
    gated_delta_rule/  Gated DeltaNet (Qwen3-Next): chunked prefill, fused recurrent decode
    moe/               grouped GEMM over tokens sorted by expert
    backend            which implementation (triton / torch) runs for a tensor's device

The kernels are imported lazily (on first attribute access), so ``import opdisagg_rt.kernels``
and ``opdisagg_rt.kernels.backend`` work without triton, and triton reads ``TRITON_INTERPRET``
when the kernel modules are first imported (tests set it before that).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from . import backend

_EXPORTS = {
    "paged_decode_attention": "attention",
    "paged_prefill_attention": "attention",
    "naive_paged_attention": "attention",
    "naive_paged_decode_attention": "attention",
    "reshape_and_cache": "cache",
    "naive_reshape_and_cache": "cache",
    "chunk_lightning_attn": "lightning_attn",
    "fused_recurrent_lightning_attn": "lightning_attn",
    "naive_chunk_lightning_attn": "lightning_attn",
    "naive_recurrent_lightning_attn": "lightning_attn",
    "chunk_gated_delta_rule": "gated_delta_rule",
    "fused_recurrent_gated_delta_rule": "gated_delta_rule",
    "naive_chunk_gated_delta_rule": "gated_delta_rule",
    "naive_recurrent_gated_delta_rule": "gated_delta_rule",
    "grouped_gemm": "moe",
    "naive_grouped_gemm": "moe",
    "sort_by_expert": "moe",
}
_SUBPACKAGES = ("attention", "cache", "lightning_attn", "gated_delta_rule", "moe", "utils")

__all__ = ["backend", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
