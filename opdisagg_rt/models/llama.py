"""Llama-family decoders (Llama, Mistral, SmolLM2) as a sequence of named operations."""
from __future__ import annotations

import torch

from opdisagg_rt.config import ModelConfig
from opdisagg_rt.layers.attention import AttentionOp, OProjOp, QKVProjOp
from opdisagg_rt.layers.base import Op
from opdisagg_rt.layers.embedding import EmbedOp, LMHeadOp
from opdisagg_rt.layers.mlp import SwiGLUMLPOp
from opdisagg_rt.layers.norm import RMSNormOp
from opdisagg_rt.layers.rope import RotaryEmbedding

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class WeightSource:
    """Takes named tensors out of a loaded state dict, checking shapes, converting dtype once."""

    def __init__(self, weights: dict[str, torch.Tensor], dtype: torch.dtype, origin: str):
        self.weights, self.dtype, self.origin = weights, dtype, origin

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in the model's dtype (or `dtype`: e.g. float32 for attention sinks)."""
        w = self.weights.get(name)
        if w is None:
            raise ValueError(f"{self.origin}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{self.origin}: tensor {name!r} has shape {list(w.shape)}, expected {list(shape)}")
        return w.to(dtype or self.dtype).contiguous()

    def maybe(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, shape) if name in self.weights else None

    def gguf_blocks(self, *names: str) -> tuple[str, torch.Tensor] | None:
        """(kind, raw GGUF blocks) of these matrices stacked by rows (as the fused projections
        stack them), or None unless all share one streamed block kind and the model runs in
        bf16 (see Linear.use_gguf)."""
        if self.dtype != torch.bfloat16:
            return None
        for kind in ("q4_1", "q8_0"):
            blocks = [self.weights.get(f"{n}.{kind}") for n in names]
            if all(b is not None for b in blocks):
                return kind, torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        return None


def layer_window(cfg: ModelConfig, i: int) -> int | None:
    """Sliding window of layer i, or None for full attention."""
    hf = cfg.hf_config
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        return window if layer_types[i] == "sliding_attention" else None
    if hf.get("use_sliding_window") is False:  # Qwen configs keep a window they do not use
        return None
    return window if window else None


def check_layer_types(types, num_layers: int, allowed: tuple[str, ...], origin: str) -> list[str]:
    """A config's `layer_types` (one attention kind per layer), checked: one entry per layer,
    each a kind this builder supports; errors name the field, the index and the value."""
    types = list(types)
    if len(types) != num_layers:
        raise ValueError(f"{origin}: layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
    for i, kind in enumerate(types):
        if kind not in allowed:
            raise ValueError(f"{origin}: layer_types[{i}]={kind!r} is not supported ({', '.join(allowed)})")
    return types


def attention_ops(cfg: ModelConfig, w: WeightSource, i: int, rope: RotaryEmbedding,
                  qk_norm: bool = False, sinks: bool = False) -> list[Op]:
    """`attn_norm`, `qkv_proj`, `attn`, `o_proj` of layer i in transformers' Llama names;
    q/k/v/o biases are used when the checkpoint has them. `qk_norm`: per-head RMSNorm of q and k
    (`self_attn.q_norm`/`k_norm`, Qwen3); `sinks`: per-head sink logits (`self_attn.sinks`)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    nh, nkv, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    p, n = f"model.layers.{i}.", f"layers.{i}."
    biases = None
    if p + "self_attn.q_proj.bias" in w.weights:
        biases = (w.get(p + "self_attn.q_proj.bias", (nh * hd,)), w.get(p + "self_attn.k_proj.bias", (nkv * hd,)),
                  w.get(p + "self_attn.v_proj.bias", (nkv * hd,)))
    norms = {}
    if qk_norm:
        norms = dict(q_norm=w.get(p + "self_attn.q_norm.weight", (hd,)),
                     k_norm=w.get(p + "self_attn.k_norm.weight", (hd,)), norm_eps=eps)
    sink = w.get(p + "self_attn.sinks", (nh,), torch.float32) if sinks else None
    qkv = QKVProjOp(n + "qkv_proj", w.get(p + "self_attn.q_proj.weight", (nh * hd, h)),
                    w.get(p + "self_attn.k_proj.weight", (nkv * hd, h)),
                    w.get(p + "self_attn.v_proj.weight", (nkv * hd, h)), biases, **norms)
    qkv.proj.use_gguf(w.gguf_blocks(*(p + f"self_attn.{x}_proj.weight" for x in "qkv")))
    o_proj = OProjOp(n + "o_proj", w.get(p + "self_attn.o_proj.weight", (h, nh * hd)),
                     w.maybe(p + "self_attn.o_proj.bias", (h,)))
    o_proj.proj.use_gguf(w.gguf_blocks(p + "self_attn.o_proj.weight"))
    return [
        RMSNormOp(n + "attn_norm", w.get(p + "input_layernorm.weight", (h,)), eps),
        qkv,
        AttentionOp(n + "attn", nh, nkv, hd, rope, window=layer_window(cfg, i), sinks=sink),
        o_proj,
    ]


def dense_mlp_op(cfg: ModelConfig, w: WeightSource, i: int, intermediate: int | None = None) -> Op:
    """`layers.{i}.mlp`: SwiGLU from `mlp.{gate,up,down}_proj`."""
    h, inter, p = cfg.hidden_size, intermediate or cfg.intermediate_size, f"model.layers.{i}.mlp."
    mlp = SwiGLUMLPOp(f"layers.{i}.mlp", w.get(p + "gate_proj.weight", (inter, h)),
                      w.get(p + "up_proj.weight", (inter, h)), w.get(p + "down_proj.weight", (h, inter)))
    mlp.gate_up.use_gguf(w.gguf_blocks(p + "gate_proj.weight", p + "up_proj.weight"))
    mlp.down.use_gguf(w.gguf_blocks(p + "down_proj.weight"))
    return mlp


def head_ops(cfg: ModelConfig, w: WeightSource, embed: torch.Tensor) -> list[Op]:
    """`final_norm` and `lm_head` (tied to `embed` when the config says so)."""
    h = cfg.hidden_size
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head = embed if cfg.tie_word_embeddings else w.get(head_name, (cfg.vocab_size, h))
    lm_head = LMHeadOp("lm_head", head)
    lm_head.proj.use_gguf(w.gguf_blocks(head_name))
    return [RMSNormOp("final_norm", w.get("model.norm.weight", (h,)), cfg.rms_norm_eps, rows="logits"), lm_head]


def build_llama_ops(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                    max_positions: int, origin: str = "model") -> list[Op]:
    if cfg.architecture not in LLAMA_ARCHITECTURES:
        raise ValueError(f"{origin}: architecture {cfg.architecture!r} is not supported "
                         f"(supported: {', '.join(LLAMA_ARCHITECTURES)})")
    w = WeightSource(weights, dtype, origin)
    h = cfg.hidden_size
    rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
    embed = w.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    ops: list[Op] = [EmbedOp("embed", embed)]
    for i in range(cfg.num_hidden_layers):
        ops += attention_ops(cfg, w, i, rope)
        ops += [RMSNormOp(f"layers.{i}.mlp_norm", w.get(f"model.layers.{i}.post_attention_layernorm.weight", (h,)),
                          cfg.rms_norm_eps),
                dense_mlp_op(cfg, w, i)]
    return ops + head_ops(cfg, w, embed)
