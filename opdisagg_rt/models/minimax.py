"""MiniMax (MiniMaxForCausalLM: MiniMax-Text-01) as named operations.

Semantics (transformers' modeling_minimax): `layer_types` makes each layer Lightning attention
(`linear_attention`, opdisagg_rt.layers.lightning_attention) or softmax attention
(`full_attention`: GQA with RoPE, the config's `sliding_window` if any, partial rotary when the
config gives `rotary_dim`); every layer ends in a Mixtral-style MoE (softmax, top-k,
renormalised). The residual stream is post-norm-like: the normalized input is the residual,

    h = norm1(x);  x = alpha_attn * h + beta_attn * attn(h)
    h = norm2(x);  x = alpha_mlp * h + beta_mlp * moe(h)

with per-type scalars (`linear_attn_alpha_factor`, `full_attn_alpha_factor`,
`mlp_alpha_factor` and the betas). So `o_proj` and `moe` read `hidden` (the normalized rows)
instead of `residual` and overwrite `residual`; op names are DESIGN.md's.
"""
from __future__ import annotations

from typing import Any

import torch

from opdisagg_rt.config import ModelConfig
from opdisagg_rt.layers.attention import AttentionOp, QKVProjOp
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.embedding import EmbedOp
from opdisagg_rt.layers.lightning_attention import (LightningAttentionOp, LightningOProjOp, LightningQKVProjOp,
                                                    minimax_slopes, scaled_residual)
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.layers.moe import Experts, MoEOp, Router, RouterConfig
from opdisagg_rt.layers.norm import RMSNormOp
from opdisagg_rt.layers.rope import RotaryEmbedding
from opdisagg_rt.models.llama import WeightSource, check_layer_types, head_ops
from opdisagg_rt.models.moe_models import _num_experts, _stacked_experts
from opdisagg_rt.step_batch import StepBatch

MINIMAX_ARCHITECTURES = ("MiniMaxForCausalLM",)
LAYER_TYPES = ("linear_attention", "full_attention")


class ScaledOProjOp(Op):
    """`layers.{i}.o_proj` of a softmax-attention layer: residual = alpha * hidden + beta * o(attn_out)."""

    def __init__(self, name: str, weight: torch.Tensor, alpha: float, beta: float):
        self.name, self.alpha, self.beta = name, float(alpha), float(beta)
        self.proj = Linear(weight)
        self.reads, self.writes = ("attn_out", "hidden"), ("residual",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"o": self.proj.weight}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["residual"] = scaled_residual(t["hidden"], self.proj(t["attn_out"]), self.alpha, self.beta)


class ScaledMoEOp(MoEOp):
    """`layers.{i}.moe`: residual = alpha * hidden + beta * moe(hidden)."""

    def __init__(self, name: str, router: Router, experts: Experts, alpha: float, beta: float):
        super().__init__(name, router, experts)
        self.alpha, self.beta = float(alpha), float(beta)
        self.reads = ("hidden",)

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["residual"] = scaled_residual(t["hidden"], self.moe(t["hidden"]), self.alpha, self.beta)


def minimax_layer_types(hf: dict[str, Any], num_layers: int, origin: str) -> list[str]:
    types = hf.get("layer_types")
    if types is None:  # transformers' default: full attention on even layers
        types = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(num_layers)]
    return check_layer_types(types, num_layers, LAYER_TYPES, origin)


def _factor(hf: dict[str, Any], key: str) -> float:
    value = hf.get(key, 1)
    return 1.0 if value is None else float(value)


def _slope(w: WeightSource, p: str, cfg: ModelConfig, i: int) -> torch.Tensor:
    """The checkpoint's slope_rate buffer when saved (transformers saves it), else MiniMax's formula."""
    nh = cfg.num_attention_heads
    if p + "slope_rate" in w.weights:
        return w.get(p + "slope_rate", (nh, 1, 1), torch.float32).view(nh)
    return minimax_slopes(nh, i, cfg.num_hidden_layers)


def _lightning_ops(cfg: ModelConfig, w: WeightSource, i: int, chunk_size: int) -> list[Op]:
    h, hd, nh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    p, n = f"model.layers.{i}.self_attn.", f"layers.{i}."
    hf = cfg.hf_config
    return [
        LightningQKVProjOp(n + "qkv_proj", w.get(p + "qkv_proj.weight", (3 * nh * hd, h)),
                           w.get(p + "output_gate.weight", (nh * hd, h)), nh, hd),
        LightningAttentionOp(n + "attn", nh, hd, _slope(w, p, cfg, i), chunk_size),
        LightningOProjOp(n + "o_proj", w.get(p + "out_proj.weight", (h, nh * hd)), w.get(p + "norm.weight", (nh * hd,)),
                         _factor(hf, "linear_attn_alpha_factor"), _factor(hf, "linear_attn_beta_factor")),
    ]


def _full_attention_ops(cfg: ModelConfig, w: WeightSource, i: int, rope: RotaryEmbedding) -> list[Op]:
    h, hd = cfg.hidden_size, cfg.head_dim
    nh, nkv, hf = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hf_config
    p, n = f"model.layers.{i}.self_attn.", f"layers.{i}."
    window = hf.get("sliding_window") or None
    return [
        QKVProjOp(n + "qkv_proj", w.get(p + "q_proj.weight", (nh * hd, h)), w.get(p + "k_proj.weight", (nkv * hd, h)),
                  w.get(p + "v_proj.weight", (nkv * hd, h))),
        AttentionOp(n + "attn", nh, nkv, hd, rope, window=window),
        ScaledOProjOp(n + "o_proj", w.get(p + "o_proj.weight", (h, nh * hd)),
                      _factor(hf, "full_attn_alpha_factor"), _factor(hf, "full_attn_beta_factor")),
    ]


def _moe_op(cfg: ModelConfig, w: WeightSource, i: int, origin: str) -> Op:
    """Mixtral's MoE: checkpoint names `block_sparse_moe.*` (saved) or `mlp.*` (in memory)."""
    hf, h, inter = cfg.hf_config, cfg.hidden_size, cfg.intermediate_size
    e, top_k = _num_experts(hf, origin), int(hf.get("num_experts_per_tok") or 2)
    p = f"model.layers.{i}.block_sparse_moe."
    if p + "gate.weight" not in w.weights:
        p = f"model.layers.{i}.mlp."
    gate_up, down = _stacked_experts(w, p, e, h, inter, ("w1", "w3", "w2"))
    name = f"layers.{i}.moe"
    router = Router(name + ".router", w.get(p + "gate.weight", (e, h)), RouterConfig(top_k, renormalize=True))
    return ScaledMoEOp(name, router, Experts(name + ".experts", gate_up, down),
                       _factor(hf, "mlp_alpha_factor"), _factor(hf, "mlp_beta_factor"))


def _rotary_dim(hf: dict[str, Any], head_dim: int, origin: str) -> int:
    rot = int(hf.get("rotary_dim") or head_dim)  # MiniMax-Text-01's own config field
    if not 0 < rot <= head_dim or rot % 2:
        raise ValueError(f"{origin}: rotary_dim={rot} must be even and in (0, head_dim={head_dim}]")
    return rot


def build_minimax_ops(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                      max_positions: int, origin: str = "model") -> list[Op]:
    if cfg.architecture not in MINIMAX_ARCHITECTURES:
        raise ValueError(f"{origin}: architecture {cfg.architecture!r} is not MiniMax")
    hf = cfg.hf_config
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{origin}: hidden_act={act!r} is not supported (silu)")
    block_size = int(hf.get("block_size") or 256)
    if block_size < 1:
        raise ValueError(f"{origin}: block_size={block_size} must be >= 1")
    # The chunked form is exact for any chunk length; chunks above 64 only grow the decay tables
    # ([heads, C, C] per layer) and the intra-chunk work.
    chunk_size = min(block_size, 64)
    w = WeightSource(weights, dtype, origin)
    h = cfg.hidden_size
    types = minimax_layer_types(hf, cfg.num_hidden_layers, origin)
    rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                           rotary_dim=_rotary_dim(hf, cfg.head_dim, origin))
    embed = w.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    ops: list[Op] = [EmbedOp("embed", embed)]
    for i, kind in enumerate(types):
        p = f"model.layers.{i}."
        ops.append(RMSNormOp(f"layers.{i}.attn_norm", w.get(p + "input_layernorm.weight", (h,)), cfg.rms_norm_eps))
        if kind == "linear_attention":
            ops += _lightning_ops(cfg, w, i, chunk_size)
        else:
            ops += _full_attention_ops(cfg, w, i, rope)
        ops.append(RMSNormOp(f"layers.{i}.mlp_norm", w.get(p + "post_attention_layernorm.weight", (h,)),
                             cfg.rms_norm_eps))
        ops.append(_moe_op(cfg, w, i, origin))
    return ops + head_ops(cfg, w, embed)
