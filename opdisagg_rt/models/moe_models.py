"""MoE decoders as named operations: Mixtral, Qwen3-MoE (and Qwen2-MoE's shared expert), gpt-oss.

Each layer is the Llama attention block (with the family's variants: q/k norm, biases, sinks,
per-layer sliding window) followed by `layers.{i}.mlp_norm` and `layers.{i}.moe` (or a dense
`layers.{i}.mlp` on Qwen's `mlp_only_layers` / `decoder_sparse_step`).

Expert weights are read from transformers' checkpoint names: per-expert tensors
(Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen `mlp.experts.{e}.{gate,up,down}_proj`),
the stacked form transformers 5 keeps in memory (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`), or gpt-oss's fused, transposed, interleaved form
(`mlp.experts.gate_up_proj [E, H, 2I]` with gate = columns 0::2, up = 1::2, plus biases).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from opdisagg_rt.config import ModelConfig
from opdisagg_rt.layers.base import Op
from opdisagg_rt.layers.embedding import EmbedOp
from opdisagg_rt.layers.moe import Experts, MoEOp, Router, RouterConfig, SharedExpert
from opdisagg_rt.layers.norm import RMSNormOp
from opdisagg_rt.layers.rope import RotaryEmbedding
from opdisagg_rt.models.llama import WeightSource, attention_ops, dense_mlp_op, head_ops

MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "GptOssForCausalLM")


# ---- RoPE: YaRN (gpt-oss) ----------------------------------------------------------------------

def yarn_inv_freq(dim: int, theta: float, s: dict[str, Any],
                  max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and cos/sin scale, as transformers' `_compute_yarn_parameters`."""
    orig = float(s["original_max_position_embeddings"])
    factor = s.get("factor")
    factor = float(factor) if factor is not None else max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def make_rope(cfg: ModelConfig, max_positions: int) -> RotaryEmbedding:
    scaling = cfg.rope_scaling
    if not scaling or scaling.get("rope_type") != "yarn":
        return RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, scaling)
    rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, None)
    inv_freq, att = yarn_inv_freq(cfg.head_dim, cfg.rope_theta, scaling, cfg.max_position_embeddings)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    rope.cos_sin_cache = torch.cat([freqs.cos() * att, freqs.sin() * att], dim=-1)
    return rope


# ---- expert weights -------------------------------------------------------------------------------

def _stacked_experts(w: WeightSource, p: str, e: int, h: int, inter: int,
                     names: tuple[str, str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """([E, 2I, H] gate rows then up rows, [E, H, I]) from per-expert or stacked tensors."""
    if p + "experts.gate_up_proj" in w.weights:
        return (w.get(p + "experts.gate_up_proj", (e, 2 * inter, h)),
                w.get(p + "experts.down_proj", (e, h, inter)))
    g, u, d = names
    gate_up = torch.stack([torch.cat([w.get(f"{p}experts.{j}.{g}.weight", (inter, h)),
                                      w.get(f"{p}experts.{j}.{u}.weight", (inter, h))], 0) for j in range(e)])
    down = torch.stack([w.get(f"{p}experts.{j}.{d}.weight", (h, inter)) for j in range(e)])
    return gate_up, down


def _num_experts(hf: dict[str, Any], origin: str) -> int:
    n = hf.get("num_local_experts") or hf.get("num_experts")
    if not n:
        raise ValueError(f"{origin}: config has no 'num_local_experts' / 'num_experts'")
    return int(n)


def _qwen_is_moe_layer(hf: dict[str, Any], i: int, num_experts: int) -> bool:
    return (i not in (hf.get("mlp_only_layers") or []) and num_experts > 0
            and (i + 1) % int(hf.get("decoder_sparse_step") or 1) == 0)


def _moe_op(cfg: ModelConfig, w: WeightSource, i: int, origin: str) -> Op:
    hf, h, arch = cfg.hf_config, cfg.hidden_size, cfg.architecture
    e, top_k = _num_experts(hf, origin), int(hf["num_experts_per_tok"])
    name = f"layers.{i}.moe"
    if arch == "MixtralForCausalLM":
        p = f"model.layers.{i}.block_sparse_moe."
        if p + "gate.weight" not in w.weights:  # transformers 5's in-memory names
            p = f"model.layers.{i}.mlp."
        inter = cfg.intermediate_size
        gate_up, down = _stacked_experts(w, p, e, h, inter, ("w1", "w3", "w2"))
        router = Router(name + ".router", w.get(p + "gate.weight", (e, h)), RouterConfig(top_k, renormalize=True))
        return MoEOp(name, router, Experts(name + ".experts", gate_up, down))
    if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        p = f"model.layers.{i}.mlp."
        inter = int(hf.get("moe_intermediate_size") or cfg.intermediate_size)
        gate_up, down = _stacked_experts(w, p, e, h, inter, ("gate_proj", "up_proj", "down_proj"))
        router = Router(name + ".router", w.get(p + "gate.weight", (e, h)),
                        RouterConfig(top_k, renormalize=bool(hf.get("norm_topk_prob", False))))
        shared = None
        if p + "shared_expert.gate_proj.weight" in w.weights:
            si = int(hf["shared_expert_intermediate_size"])
            shared = SharedExpert(w.get(p + "shared_expert.gate_proj.weight", (si, h)),
                                  w.get(p + "shared_expert.up_proj.weight", (si, h)),
                                  w.get(p + "shared_expert.down_proj.weight", (h, si)),
                                  w.maybe(p + "shared_expert_gate.weight", (1, h)))
        return MoEOp(name, router, Experts(name + ".experts", gate_up, down), shared)
    if arch == "GptOssForCausalLM":
        p = f"model.layers.{i}.mlp."
        inter = cfg.intermediate_size
        if p + "experts.gate_up_proj_blocks" in w.weights:
            raise ValueError(f"{origin}: MXFP4-quantized gpt-oss experts ({p}experts.gate_up_proj_blocks) "
                             "are not supported; dequantize the checkpoint to bf16 first")
        fused = w.get(p + "experts.gate_up_proj", (e, h, 2 * inter)).transpose(1, 2)  # [E, 2I, H] interleaved
        gate_up = torch.cat([fused[:, 0::2], fused[:, 1::2]], 1).contiguous()
        fused_b = w.get(p + "experts.gate_up_proj_bias", (e, 2 * inter))
        gate_up_b = torch.cat([fused_b[:, 0::2], fused_b[:, 1::2]], 1).contiguous()
        down = w.get(p + "experts.down_proj", (e, inter, h)).transpose(1, 2).contiguous()
        down_b = w.get(p + "experts.down_proj_bias", (e, h))
        router = Router(name + ".router", w.get(p + "router.weight", (e, h)),
                        RouterConfig(top_k, softmax_after_topk=True), w.get(p + "router.bias", (e,)))
        experts = Experts(name + ".experts", gate_up, down, gate_up_b, down_b, activation="swiglu_oai",
                          alpha=float(hf.get("swiglu_alpha", 1.702)), limit=float(hf.get("swiglu_limit", 7.0)))
        return MoEOp(name, router, experts)
    raise ValueError(f"{origin}: architecture {arch!r} is not an MoE family ({', '.join(MOE_ARCHITECTURES)})")


def build_moe_ops(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                  max_positions: int, origin: str = "model") -> list[Op]:
    arch = cfg.architecture
    if arch not in MOE_ARCHITECTURES:
        raise ValueError(f"{origin}: architecture {arch!r} is not supported by the MoE builder "
                         f"(supported: {', '.join(MOE_ARCHITECTURES)})")
    w = WeightSource(weights, dtype, origin)
    hf, h = cfg.hf_config, cfg.hidden_size
    qwen = arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
    num_experts = _num_experts(hf, origin)
    rope = make_rope(cfg, max_positions)
    embed = w.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    ops: list[Op] = [EmbedOp("embed", embed)]
    for i in range(cfg.num_hidden_layers):
        ops += attention_ops(cfg, w, i, rope, qk_norm=arch == "Qwen3MoeForCausalLM",
                             sinks=arch == "GptOssForCausalLM")
        ops.append(RMSNormOp(f"layers.{i}.mlp_norm", w.get(f"model.layers.{i}.post_attention_layernorm.weight", (h,)),
                             cfg.rms_norm_eps))
        if qwen and not _qwen_is_moe_layer(hf, i, num_experts):
            ops.append(dense_mlp_op(cfg, w, i))
        else:
            ops.append(_moe_op(cfg, w, i, origin))
    return ops + head_ops(cfg, w, embed)
