"""Rotary position embedding (rotate-half layout), with Llama-3 and linear scaling."""
from __future__ import annotations

import math
from typing import Any

import torch

from opdisagg_rt import ops


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                  rotary_dim: int | None = None) -> torch.Tensor:
    rotary_dim = rotary_dim or head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", None):
        return inv_freq.float()
    if rope_type == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths are divided by `factor`,
    short ones kept, and the band between interpolated smoothly."""
    try:
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
    except KeyError as e:
        raise ValueError(f"rope_scaling (llama3) is missing field {e.args[0]!r}") from None
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """The float32 angle table `[max_positions, rotary_dim]` = `[cos | sin]`, applied in place
    by the `rotary_embedding` op (one pass over q and k, float32 math)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, rotary_dim: int | None = None, is_neox: bool = True):
        self.rotary_dim = rotary_dim or head_dim
        self.is_neox = is_neox
        inv_freq = rope_inv_freq(head_dim, theta, scaling, self.rotary_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # float32 like transformers' cos/sin; they are not rounded to a bf16 model's dtype (HF
        # rounds them, and each product): at most one bf16 ulp apart from HF per element.
        self.cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.max_positions = max_positions

    def apply_(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim], rotated in place."""
        ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox)
