"""Rotary position embedding (rotate-half layout), with Llama-3 and linear scaling."""
from __future__ import annotations

import math
from typing import Any

import torch


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
    """cos/sin tables for every position up to `max_positions`, looked up per step."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype, rotary_dim: int | None = None):
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = rope_inv_freq(head_dim, theta, scaling, self.rotary_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # cos/sin computed in float32 then cast, as transformers does before applying them.
        self.cos = freqs.cos().to(dtype)
        self.sin = freqs.sin().to(dtype)
        self.max_positions = max_positions

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; cos/sin: [T, rotary_dim/2]."""
        half = self.rotary_dim // 2
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x[..., :half], x[..., half:self.rotary_dim]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        if self.rotary_dim < x.shape[-1]:
            rotated = torch.cat([rotated, x[..., self.rotary_dim:]], dim=-1)
        return rotated
