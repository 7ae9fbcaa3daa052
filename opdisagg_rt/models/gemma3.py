"""Gemma-3 text decoder (Gemma3ForCausalLM) as a sequence of named operations.

Semantics (transformers' modeling_gemma3): RMSNorm scales by (1 + w) in float32 and then casts;
the embedding is multiplied by sqrt(hidden) (rounded to the weights' dtype); q and k get a
per-head (1 + w) RMSNorm before RoPE; attention scale is query_pre_attn_scalar ** -0.5; each
layer has pre- and post-attention and pre- and post-feedforward norms; the MLP is GeGLU with
gelu(tanh approximation); `layer_types` picks sliding-window layers (local RoPE base
`rope_local_base_freq`, window `sliding_window`) and full-attention layers (global `rope_theta`
with its rope scaling); optional final logit soft-capping.

Operation names are the Llama ones (DESIGN.md); the extra norms live inside existing operations,
so the stage-spec globs that cover a Llama cover Gemma-3 too:
  `layers.{i}.attn_norm`  input_layernorm
  `layers.{i}.qkv_proj`   q/k/v projections + q_norm/k_norm
  `layers.{i}.attn`       RoPE (local or global), paged attention (window or full)
  `layers.{i}.o_proj`     o_proj + post_attention_layernorm, added to the residual
  `layers.{i}.mlp_norm`   pre_feedforward_layernorm
  `layers.{i}.mlp`        GeGLU MLP + post_feedforward_layernorm, added to the residual
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdisagg_rt.config import ModelConfig
from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.layers.rope import RotaryEmbedding
from opdisagg_rt.models.llama import WeightSource
from opdisagg_rt.step_batch import StepBatch

GEMMA3_ARCHITECTURES = ("Gemma3ForCausalLM",)


def gemma_rms_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Gemma3RMSNorm: (x_f32 * rsqrt(mean(x^2) + eps) * (1 + w)_f32).to(x.dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight_plus_one).to(x.dtype)


class GemmaRMSNormOp(Op):
    """reads `residual`, writes `hidden`; rows="logits" keeps only the rows whose logits are needed."""

    def __init__(self, name: str, weight: torch.Tensor, eps: float, rows: str = "all"):
        self.name, self.eps, self.rows = name, eps, rows
        self.weight = weight.float() + 1.0  # float32 (1 + w), as HF computes it
        self.reads, self.writes = ("residual",), ("hidden",)

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        x = t["residual"]
        if self.rows == "logits":
            x = x.index_select(0, batch.logits_indices)
        t["hidden"] = gemma_rms_norm(x, self.weight, self.eps)


class Gemma3EmbedOp(Op):
    def __init__(self, name: str, weight: torch.Tensor, hidden_size: int):
        self.name, self.weight = name, weight
        # HF: embed_scale (float32 sqrt(hidden)) cast to the weights' dtype, then multiplied.
        self.scale = torch.tensor(hidden_size ** 0.5, dtype=torch.float32).to(weight.dtype)
        self.reads, self.writes = (), ("residual",)

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["residual"] = F.embedding(batch.input_ids, self.weight) * self.scale


class Gemma3QKVProjOp(Op):
    """q/k/v projections (one GEMM) and Gemma's per-head (1 + w) RMSNorm of q and k."""

    def __init__(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 q_norm: torch.Tensor, k_norm: torch.Tensor, head_dim: int, eps: float):
        self.name = name
        self.sizes = (q.shape[0], k.shape[0], v.shape[0])
        self.proj = Linear(torch.cat([q, k, v], 0))
        self.q_norm, self.k_norm = q_norm.float() + 1.0, k_norm.float() + 1.0
        self.head_dim, self.eps = head_dim, eps
        self.reads, self.writes = ("hidden",), ("q", "k", "v")

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"qkv": self.proj.weight, "q_norm": self.q_norm, "k_norm": self.k_norm}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        q, k, v = self.proj(t["hidden"]).split(self.sizes, dim=-1)
        n, hd = q.shape[0], self.head_dim
        t["q"] = gemma_rms_norm(q.reshape(n, -1, hd), self.q_norm, self.eps).reshape(n, -1)
        t["k"] = gemma_rms_norm(k.reshape(n, -1, hd), self.k_norm, self.eps).reshape(n, -1)
        t["v"] = v


class Gemma3OProjOp(Op):
    """o_proj, then post_attention_layernorm, added into the residual stream."""

    def __init__(self, name: str, weight: torch.Tensor, post_norm: torch.Tensor, eps: float):
        self.name = name
        self.proj = Linear(weight)
        self.post_norm, self.eps = post_norm.float() + 1.0, eps
        self.reads, self.writes = ("attn_out", "residual"), ("residual",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"o": self.proj.weight, "post_attn_norm": self.post_norm}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["residual"] = t["residual"] + gemma_rms_norm(self.proj(t["attn_out"]), self.post_norm, self.eps)


class Gemma3MLPOp(Op):
    """GeGLU (gelu tanh approximation) with fused gate/up, then post_feedforward_layernorm,
    added into the residual stream."""

    def __init__(self, name: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 post_norm: torch.Tensor, eps: float):
        self.name = name
        self.intermediate = gate.shape[0]
        self.gate_up = Linear(torch.cat([gate, up], 0))
        self.down = Linear(down)
        self.post_norm, self.eps = post_norm.float() + 1.0, eps
        self.reads, self.writes = ("hidden", "residual"), ("residual",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"gate_up": self.gate_up.weight, "down": self.down.weight, "post_ffn_norm": self.post_norm}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        gate, up = self.gate_up(t["hidden"]).split(self.intermediate, dim=-1)
        out = self.down(F.gelu(gate, approximate="tanh") * up)
        t["residual"] = t["residual"] + gemma_rms_norm(out, self.post_norm, self.eps)


class Gemma3LMHeadOp(Op):
    """LM head with optional final logit soft-capping; writes float32 `logits`."""

    def __init__(self, name: str, weight: torch.Tensor, softcap: float | None):
        self.name, self.weight, self.softcap = name, weight, softcap
        self.proj = Linear(weight)
        self.reads, self.writes = ("hidden",), ("logits",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        logits = self.proj(t["hidden"])
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        t["logits"] = logits.float()


def _rope_params(hf: dict) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """((local theta, scaling), (global theta, scaling)) from transformers 5's per-layer-type
    `rope_parameters` or the older rope_theta / rope_local_base_freq / rope_scaling fields."""
    def split(params: dict | None, default_theta: float) -> tuple[float, dict | None]:
        params = dict(params or {})
        theta = float(params.pop("rope_theta", default_theta))
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.pop("type", None)
        return theta, (None if params.get("rope_type", "default") == "default" else params)

    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        return (split(rp.get("sliding_attention"), hf.get("rope_local_base_freq", 10000.0)),
                split(rp.get("full_attention"), hf.get("rope_theta", 1_000_000.0)))
    global_params = dict(hf.get("rope_scaling") or {})
    global_params.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    return (float(hf.get("rope_local_base_freq", 10000.0)), None), split(global_params, 1_000_000.0)


def gemma3_layer_types(hf: dict, num_layers: int) -> list[str]:
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    return list(types)


def build_gemma3_ops(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                     max_positions: int, origin: str = "model") -> list[Op]:
    hf = cfg.hf_config
    if cfg.architecture not in GEMMA3_ARCHITECTURES:
        raise ValueError(f"{origin}: architecture {cfg.architecture!r} is not Gemma-3")
    for key in ("attn_logit_softcapping",):
        if hf.get(key) is not None:
            raise ValueError(f"{origin}: {key}={hf[key]} is not supported")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{origin}: use_bidirectional_attention is not supported (decoder only)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{origin}: hidden_activation={act!r} is not supported (gelu_pytorch_tanh)")
    w = WeightSource(weights, dtype, origin)
    h, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv, eps = cfg.num_attention_heads, cfg.num_key_value_heads, float(hf.get("rms_norm_eps", 1e-6))
    scale = float(hf.get("query_pre_attn_scalar") or hd) ** -0.5
    types = gemma3_layer_types(hf, cfg.num_hidden_layers)
    window = hf.get("sliding_window")
    (lt, ls), (gt, gs) = _rope_params(hf)
    local_rope = RotaryEmbedding(hd, max_positions, lt, ls)
    global_rope = RotaryEmbedding(hd, max_positions, gt, gs)
    embed = w.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    ops: list[Op] = [Gemma3EmbedOp("embed", embed, h)]
    for i in range(cfg.num_hidden_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        sliding = types[i] == "sliding_attention"
        if types[i] not in ("sliding_attention", "full_attention"):
            raise ValueError(f"{origin}: layer {i} has unsupported type {types[i]!r}")
        ops += [
            GemmaRMSNormOp(n + "attn_norm", w.get(p + "input_layernorm.weight", (h,)), eps),
            Gemma3QKVProjOp(n + "qkv_proj", w.get(p + "self_attn.q_proj.weight", (nh * hd, h)),
                            w.get(p + "self_attn.k_proj.weight", (nkv * hd, h)),
                            w.get(p + "self_attn.v_proj.weight", (nkv * hd, h)),
                            w.get(p + "self_attn.q_norm.weight", (hd,)), w.get(p + "self_attn.k_norm.weight", (hd,)),
                            hd, eps),
            AttentionOp(n + "attn", nh, nkv, hd, local_rope if sliding else global_rope,
                        window=window if sliding and window else None, scale=scale),
            Gemma3OProjOp(n + "o_proj", w.get(p + "self_attn.o_proj.weight", (h, nh * hd)),
                          w.get(p + "post_attention_layernorm.weight", (h,)), eps),
            GemmaRMSNormOp(n + "mlp_norm", w.get(p + "pre_feedforward_layernorm.weight", (h,)), eps),
            Gemma3MLPOp(n + "mlp", w.get(p + "mlp.gate_proj.weight", (inter, h)),
                        w.get(p + "mlp.up_proj.weight", (inter, h)), w.get(p + "mlp.down_proj.weight", (h, inter)),
                        w.get(p + "post_feedforward_layernorm.weight", (h,)), eps),
        ]
    ops.append(GemmaRMSNormOp("final_norm", w.get("model.norm.weight", (h,)), eps, rows="logits"))
    head = embed if cfg.tie_word_embeddings else w.get("lm_head.weight", (cfg.vocab_size, h))
    ops.append(Gemma3LMHeadOp("lm_head", head, hf.get("final_logit_softcapping")))
    return ops
