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

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        w = self.weights.get(name)
        if w is None:
            raise ValueError(f"{self.origin}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{self.origin}: tensor {name!r} has shape {list(w.shape)}, expected {list(shape)}")
        return w.to(self.dtype).contiguous()

    def maybe(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, shape) if name in self.weights else None


def layer_window(cfg: ModelConfig, i: int) -> int | None:
    """Sliding window of layer i, or None for full attention."""
    hf = cfg.hf_config
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        return window if layer_types[i] == "sliding_attention" else None
    return window if window else None


def build_llama_ops(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                    max_positions: int, origin: str = "model") -> list[Op]:
    if cfg.architecture not in LLAMA_ARCHITECTURES:
        raise ValueError(f"{origin}: architecture {cfg.architecture!r} is not supported "
                         f"(supported: {', '.join(LLAMA_ARCHITECTURES)})")
    w = WeightSource(weights, dtype, origin)
    h, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    rope = RotaryEmbedding(hd, max_positions, cfg.rope_theta, cfg.rope_scaling)
    embed = w.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    ops: list[Op] = [EmbedOp("embed", embed)]
    for i in range(cfg.num_hidden_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        biases = None
        if p + "self_attn.q_proj.bias" in weights:
            biases = (w.get(p + "self_attn.q_proj.bias", (nh * hd,)), w.get(p + "self_attn.k_proj.bias", (nkv * hd,)),
                      w.get(p + "self_attn.v_proj.bias", (nkv * hd,)))
        ops += [
            RMSNormOp(n + "attn_norm", w.get(p + "input_layernorm.weight", (h,)), eps),
            QKVProjOp(n + "qkv_proj", w.get(p + "self_attn.q_proj.weight", (nh * hd, h)),
                      w.get(p + "self_attn.k_proj.weight", (nkv * hd, h)),
                      w.get(p + "self_attn.v_proj.weight", (nkv * hd, h)), biases),
            AttentionOp(n + "attn", nh, nkv, hd, rope, window=layer_window(cfg, i)),
            OProjOp(n + "o_proj", w.get(p + "self_attn.o_proj.weight", (h, nh * hd)),
                    w.maybe(p + "self_attn.o_proj.bias", (h,))),
            RMSNormOp(n + "mlp_norm", w.get(p + "post_attention_layernorm.weight", (h,)), eps),
            SwiGLUMLPOp(n + "mlp", w.get(p + "mlp.gate_proj.weight", (inter, h)),
                        w.get(p + "mlp.up_proj.weight", (inter, h)), w.get(p + "mlp.down_proj.weight", (h, inter))),
        ]
    ops.append(RMSNormOp("final_norm", w.get("model.norm.weight", (h,)), eps, rows="logits"))
    head = embed if cfg.tie_word_embeddings else w.get("lm_head.weight", (cfg.vocab_size, h))
    ops.append(LMHeadOp("lm_head", head))
    return ops
