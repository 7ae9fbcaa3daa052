"""Qwen3-Next (Qwen3NextForCausalLM) as named operations: Gated DeltaNet and gated attention
layers chosen by `layer_types`, MoE with a sigmoid-gated shared expert.

Semantics (transformers' modeling_qwen3_next): every RMSNorm is zero-centred, scaling by (1 + w)
in float32 (Gemma's; the Gemma-3 norm op is reused); attention layers ("full_attention") have a
per-head (1 + w) q/k norm, partial rotary (`partial_rotary_factor` of head_dim) and an output
gate (q_proj emits [query | gate] per head, attention output times sigmoid(gate) before
o_proj); linear layers ("linear_attention") are Gated DeltaNet (layers/gated_deltanet.py); the
FFN is MoE (`mlp_only_layers`, `decoder_sparse_step`) or a dense SwiGLU MLP.

Beyond transformers: "sliding_attention" entries of `layer_types` build the gated attention
layer with the config's `sliding_window` (the runner gives window layers their own KV cache
groups), so hybrid sliding-window + linear + full configurations (the analysis framework's tiny
hybrid) run through the same builder. transformers has no such layer in Qwen3-Next.

Operation names are DESIGN.md's for every layer kind: `attn_norm`, `qkv_proj`, `attn`,
`o_proj`, `mlp_norm`, `moe` | `mlp`.
"""
from __future__ import annotations

from typing import Any

import torch

from opdisagg_rt.config import ModelConfig
from opdisagg_rt.layers.attention import AttentionOp, OProjOp, QKVProjOp
from opdisagg_rt.layers.base import Op
from opdisagg_rt.layers.embedding import EmbedOp, LMHeadOp
from opdisagg_rt.layers.gated_deltanet import GatedDeltaNetOp, GDNInProjOp, split_in_proj
from opdisagg_rt.layers.moe import Experts, MoEOp, Router, RouterConfig, SharedExpert
from opdisagg_rt.layers.rope import RotaryEmbedding
from opdisagg_rt.models.gemma3 import GemmaRMSNormOp
from opdisagg_rt.models.llama import WeightSource, check_layer_types, dense_mlp_op, layer_window
from opdisagg_rt.models.moe_models import _qwen_is_moe_layer, _stacked_experts

QWEN3_NEXT_ARCHITECTURES = ("Qwen3NextForCausalLM",)
LAYER_TYPES = ("linear_attention", "full_attention", "sliding_attention")


def _partial_rotary_factor(hf: dict[str, Any]) -> float:
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and "partial_rotary_factor" in rp:
        return float(rp["partial_rotary_factor"])
    return float(hf.get("partial_rotary_factor", 1.0))


def _rope(cfg: ModelConfig, max_positions: int, origin: str) -> RotaryEmbedding:
    factor = _partial_rotary_factor(cfg.hf_config)
    rot = int(cfg.head_dim * factor)
    if not 0 < factor <= 1 or rot % 2:
        raise ValueError(f"{origin}: partial_rotary_factor={factor} gives rotary dim {rot} of head_dim "
                         f"{cfg.head_dim}; need an even dim in (0, head_dim]")
    return RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, rotary_dim=rot)


def _int(hf: dict[str, Any], key: str, origin: str) -> int:
    v = hf.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{origin}: config field {key!r} must be a positive integer, got {v!r}")
    return v


def _gdn_ops(cfg: ModelConfig, w: WeightSource, i: int, origin: str) -> list[Op]:
    hf, h = cfg.hf_config, cfg.hidden_size
    hk, hv = _int(hf, "linear_num_key_heads", origin), _int(hf, "linear_num_value_heads", origin)
    dk, dv = _int(hf, "linear_key_head_dim", origin), _int(hf, "linear_value_head_dim", origin)
    kernel = _int(hf, "linear_conv_kernel_dim", origin)
    if hv % hk:
        raise ValueError(f"{origin}: linear_num_value_heads={hv} is not a multiple of linear_num_key_heads={hk}")
    p, n = f"model.layers.{i}.linear_attn.", f"layers.{i}."
    conv_dim = 2 * hk * dk + hv * dv
    parts = split_in_proj(w.get(p + "in_proj_qkvz.weight", (2 * hk * dk + 2 * hv * dv, h)),
                          w.get(p + "in_proj_ba.weight", (2 * hv, h)), hk, hv, dk, dv)
    return [
        GDNInProjOp(n + "qkv_proj", *parts),
        GatedDeltaNetOp(n + "attn", hk, hv, dk, dv, w.get(p + "conv1d.weight", (conv_dim, 1, kernel))[:, 0],
                        w.get(p + "A_log", (hv,), torch.float32), w.get(p + "dt_bias", (hv,), torch.float32),
                        w.get(p + "norm.weight", (dv,)), cfg.rms_norm_eps),
        OProjOp(n + "o_proj", w.get(p + "out_proj.weight", (h, hv * dv))),
    ]


def _gated_attention_ops(cfg: ModelConfig, w: WeightSource, i: int, rope: RotaryEmbedding) -> list[Op]:
    h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    p, n = f"model.layers.{i}.self_attn.", f"layers.{i}."
    # q_proj rows are [query (hd) | gate (hd)] per head: de-interleave into two row blocks
    qg = w.get(p + "q_proj.weight", (nh * 2 * hd, h)).reshape(nh, 2, hd, h)
    biases = None
    if p + "q_proj.bias" in w.weights:
        qb = w.get(p + "q_proj.bias", (nh * 2 * hd,)).reshape(nh, 2, hd)
        biases = (qb[:, 0].reshape(-1), w.get(p + "k_proj.bias", (nkv * hd,)), w.get(p + "v_proj.bias", (nkv * hd,)),
                  qb[:, 1].reshape(-1))
    one = lambda name: (w.get(p + name, (hd,), torch.float32) + 1.0).to(w.dtype)
    qkv = QKVProjOp(n + "qkv_proj", qg[:, 0].reshape(nh * hd, h), w.get(p + "k_proj.weight", (nkv * hd, h)),
                    w.get(p + "v_proj.weight", (nkv * hd, h)), biases, q_norm=one("q_norm.weight"),
                    k_norm=one("k_norm.weight"), norm_eps=cfg.rms_norm_eps, gate=qg[:, 1].reshape(nh * hd, h))
    return [qkv, AttentionOp(n + "attn", nh, nkv, hd, rope, window=layer_window(cfg, i)),
            OProjOp(n + "o_proj", w.get(p + "o_proj.weight", (h, nh * hd)), w.maybe(p + "o_proj.bias", (h,)),
                    gated=True)]


def _ffn_op(cfg: ModelConfig, w: WeightSource, i: int, origin: str) -> Op:
    hf, h = cfg.hf_config, cfg.hidden_size
    e = int(hf.get("num_experts") or 0)
    if not _qwen_is_moe_layer(hf, i, e):
        return dense_mlp_op(cfg, w, i)
    name, p = f"layers.{i}.moe", f"model.layers.{i}.mlp."
    top_k, inter = _int(hf, "num_experts_per_tok", origin), _int(hf, "moe_intermediate_size", origin)
    gate_up, down = _stacked_experts(w, p, e, h, inter, ("gate_proj", "up_proj", "down_proj"))
    router = Router(name + ".router", w.get(p + "gate.weight", (e, h)),
                    RouterConfig(top_k, renormalize=bool(hf.get("norm_topk_prob", True))))
    shared = None
    if p + "shared_expert.gate_proj.weight" in w.weights:
        si = _int(hf, "shared_expert_intermediate_size", origin)
        shared = SharedExpert(w.get(p + "shared_expert.gate_proj.weight", (si, h)),
                              w.get(p + "shared_expert.up_proj.weight", (si, h)),
                              w.get(p + "shared_expert.down_proj.weight", (h, si)),
                              w.maybe(p + "shared_expert_gate.weight", (1, h)))
    return MoEOp(name, router, Experts(name + ".experts", gate_up, down), shared)


def qwen3_next_layer_types(hf: dict[str, Any], num_layers: int, origin: str) -> list[str]:
    types = hf.get("layer_types")
    if types is None:  # transformers' default: every 4th layer full attention
        interval = int(hf.get("full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    types = check_layer_types(types, num_layers, LAYER_TYPES, origin)
    if "sliding_attention" in types and not hf.get("sliding_window"):
        raise ValueError(f"{origin}: layer_types has sliding_attention but sliding_window={hf.get('sliding_window')!r}")
    return types


def build_qwen3_next_ops(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                         max_positions: int, origin: str = "model") -> list[Op]:
    if cfg.architecture not in QWEN3_NEXT_ARCHITECTURES:
        raise ValueError(f"{origin}: architecture {cfg.architecture!r} is not Qwen3-Next")
    hf, h, eps = cfg.hf_config, cfg.hidden_size, cfg.rms_norm_eps
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{origin}: hidden_act={act!r} is not supported (silu)")
    types = qwen3_next_layer_types(hf, cfg.num_hidden_layers, origin)
    w = WeightSource(weights, dtype, origin)
    rope = _rope(cfg, max_positions, origin)
    embed = w.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    ops: list[Op] = [EmbedOp("embed", embed)]
    for i, kind in enumerate(types):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        ops.append(GemmaRMSNormOp(n + "attn_norm", w.get(p + "input_layernorm.weight", (h,)), eps))
        ops += _gdn_ops(cfg, w, i, origin) if kind == "linear_attention" else _gated_attention_ops(cfg, w, i, rope)
        ops.append(GemmaRMSNormOp(n + "mlp_norm", w.get(p + "post_attention_layernorm.weight", (h,)), eps))
        ops.append(_ffn_op(cfg, w, i, origin))
    ops.append(GemmaRMSNormOp("final_norm", w.get("model.norm.weight", (h,)), eps, rows="logits"))
    head = embed if cfg.tie_word_embeddings else w.get("lm_head.weight", (cfg.vocab_size, h))
    return ops + [LMHeadOp("lm_head", head)]
