"""`layers.{i}.qkv_proj`, `layers.{i}.attn` and `layers.{i}.o_proj`.

The projections are compute-bound GEMMs; the attention core (RoPE, cache write, attention over
the paged cache) is memory-bound and owns the layer's KV cache, so the two can live on
different stages.

Per-architecture variants: q/k/v/o biases; per-head q/k RMSNorm (Qwen3, applied by the QKV
projection before RoPE); sliding window per layer; attention sinks (gpt-oss: a float32 logit per
head that joins each softmax denominator, honoured by decode and prefill alike); an output gate
(Qwen3-Next: `qkv_proj` also emits `gate`, `o_proj` multiplies by its sigmoid).
"""
from __future__ import annotations

import torch

from opdisagg_rt import ops
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.layers.paged_attention import paged_attention, reshape_and_cache
from opdisagg_rt.layers.rope import RotaryEmbedding
from opdisagg_rt.step_batch import StepBatch


class QKVProjOp(Op):
    def __init__(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                 norm_eps: float = 1e-6, gate: torch.Tensor | None = None):
        """q_norm / k_norm: RMSNorm weights [head_dim] applied to each head of q and k (Qwen3).
        gate: output-gate rows [num_heads * head_dim, hidden] (Qwen3-Next), projected in the
        same GEMM and written as `gate` for OProjOp(gated=True); `biases` then has 4 parts."""
        self.name = name
        self.sizes = (q.shape[0], k.shape[0], v.shape[0]) + ((gate.shape[0],) if gate is not None else ())
        if biases is not None and len(biases) != len(self.sizes):
            raise ValueError(f"{name}: {len(biases)} biases for {len(self.sizes)} projections")
        bias = torch.cat(biases) if biases is not None else None
        rows = [q, k, v] + ([gate] if gate is not None else [])
        self.proj = Linear(torch.cat(rows, 0), bias)  # one GEMM instead of three (or four)
        if (q_norm is None) != (k_norm is None):
            raise ValueError(f"{name}: q_norm and k_norm come together")
        self.q_norm, self.k_norm, self.norm_eps = q_norm, k_norm, norm_eps
        self.reads, self.writes = ("hidden",), ("q", "k", "v") + (("gate",) if gate is not None else ())

    def parameters(self) -> dict[str, torch.Tensor]:
        p = {"qkv": self.proj.weight} | ({"bias": self.proj.bias} if self.proj.bias is not None else {})
        return p | ({"q_norm": self.q_norm, "k_norm": self.k_norm} if self.q_norm is not None else {})

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        q, k, v, *gate = self.proj(t["hidden"]).split(self.sizes, dim=-1)
        if gate:
            t["gate"] = gate[0]
        if self.q_norm is not None:
            hd = self.q_norm.shape[0]
            q = ops.rms_norm(q.reshape(-1, hd), self.q_norm, self.norm_eps).view(q.shape)
            k = ops.rms_norm(k.reshape(-1, hd), self.k_norm, self.norm_eps).view(k.shape)
        t["q"], t["k"], t["v"] = q, k, v


class AttentionOp(Op):
    """Full causal or sliding-window attention with its paged KV cache (bound by the runner);
    `sinks` (float32 [num_heads]) adds one logit per head to every softmax denominator."""

    def __init__(self, name: str, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope: RotaryEmbedding, window: int | None = None, scale: float | None = None,
                 sinks: torch.Tensor | None = None):
        self.name = name
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.window = rope, window
        self.scale = scale if scale is not None else head_dim ** -0.5
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            raise ValueError(f"{name}: sinks must have shape [{num_heads}], got {list(sinks.shape)}")
        self.sinks = None if sinks is None else sinks.float().contiguous()
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.reads, self.writes = ("q", "k", "v"), ("attn_out",)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def parameters(self) -> dict[str, torch.Tensor]:
        return {} if self.sinks is None else {"sinks": self.sinks}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        n = batch.num_tokens
        # In place: q and k are this step's own buffers (views of the QKV output or of a
        # received message slot), read by nothing else.
        q = t["q"].view(n, self.num_heads, self.head_dim)
        k = t["k"].view(n, self.num_kv_heads, self.head_dim)
        self.rope.apply_(batch.positions, q, k)
        v = t["v"].reshape(n, self.num_kv_heads, self.head_dim)
        reshape_and_cache(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, batch, self.scale, self.window,
                              self.sinks)
        t["attn_out"] = out.view(n, self.num_heads * self.head_dim)


class OProjOp(Op):
    """`gated`: the attention output is multiplied by sigmoid(`gate`) before the projection
    (Qwen3-Next's gated attention; the gate comes from QKVProjOp)."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False):
        self.name, self.gated = name, gated
        self.proj = Linear(weight, bias)
        self.reads, self.writes = ("attn_out", "gate", "residual") if gated else ("attn_out", "residual"), ("residual",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"o": self.proj.weight} | ({"bias": self.proj.bias} if self.proj.bias is not None else {})

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        x = t["attn_out"]
        if self.gated:
            x = x * torch.sigmoid(t["gate"])
        t["residual"] = self.proj(x, residual=t["residual"])
