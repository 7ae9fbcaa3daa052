"""Model shapes for the cost model: parse any HF config.json into a ModelSpec, plus presets.

Only the fields that change costs are read. Anything that would silently change the count
(an unknown layer type, a missing size) raises ConfigError naming the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTN_KINDS = ("full", "sliding", "gdn", "lightning", "mla")


class ConfigError(ValueError):
    def __init__(self, field_name: str, msg: str):
        super().__init__(f"config field '{field_name}': {msg}")
        self.field = field_name


@dataclass(slots=True)
class LayerSpec:
    attn: str  # one of ATTN_KINDS
    moe: bool
    window: int | None = None  # sliding-window size for attn == "sliding"


@dataclass(slots=True)
class ModelSpec:
    name: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP
    layers: list[LayerSpec]
    tie_embeddings: bool = False
    attn_bias: bool = False
    attn_output_gate: bool = False  # Qwen3-Next: q_proj also emits a sigmoid gate per head
    qk_norm: bool = False
    sinks: bool = False  # gpt-oss: one learned logit per head
    # MoE
    num_experts: int = 0
    top_k: int = 0
    expert_size: int = 0  # intermediate size of one routed expert
    shared_size: int = 0  # total intermediate size of the shared expert(s), 0 = none
    shared_gate: bool = False  # Qwen: sigmoid gate on the shared expert output
    expert_bias: bool = False  # gpt-oss experts carry biases
    # linear attention (GDN: separate key/value head counts; Lightning: num_heads x head_dim)
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    lin_conv: int = 0  # short causal conv kernel (GDN)
    # MLA (DeepSeek)
    q_lora_rank: int = 0  # 0 = plain q projection
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # published counts for the preset tests: (total, active, what "active" counts)
    published: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def op_names(self) -> list[str]:
        names = ["embed"]
        for i, l in enumerate(self.layers):
            ffn = "moe" if l.moe else "mlp"
            names += [f"layers.{i}.{s}" for s in ("attn_norm", "qkv_proj", "attn", "o_proj", "mlp_norm", ffn)]
        return names + ["final_norm", "lm_head"]


def _get(cfg: dict, key: str, required: bool = True, default: Any = None, kind: type = int) -> Any:
    v = cfg.get(key)
    if v is None:
        if required:
            raise ConfigError(key, "missing (required to cost the model)")
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ConfigError(key, f"expected a non-negative integer, got {v!r}")
    return v


def _first(cfg: dict, keys: tuple[str, ...], default: Any = None) -> tuple[str, Any]:
    for k in keys:
        if cfg.get(k) is not None:
            return k, cfg[k]
    return keys[0], default


def _layer_attn_kinds(cfg: dict, n: int, model_type: str) -> list[tuple[str, int | None]]:
    window = cfg.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise ConfigError("sliding_window", f"expected a positive integer or null, got {window!r}")
    if cfg.get("kv_lora_rank"):
        return [("mla", None)] * n
    lin_kind = "lightning" if model_type.startswith("minimax") else "gdn"
    if cfg.get("layer_types") is not None:
        types = cfg["layer_types"]
        if not isinstance(types, list) or len(types) != n:
            raise ConfigError("layer_types", f"expected a list of {n} entries (num_hidden_layers)")
        out = []
        for i, t in enumerate(types):
            if t == "full_attention":
                out.append(("full", None))
            elif t == "sliding_attention":
                if window is None:
                    raise ConfigError("sliding_window", f"layer_types[{i}] is sliding_attention but no window is set")
                out.append(("sliding", window))
            elif t == "linear_attention":
                out.append((lin_kind, None))
            else:
                raise ConfigError(f"layer_types[{i}]", f"unknown layer type {t!r}")
        return out
    if cfg.get("attn_type_list") is not None:  # MiniMax: 0 = lightning (linear), 1 = softmax
        types = cfg["attn_type_list"]
        if not isinstance(types, list) or len(types) != n:
            raise ConfigError("attn_type_list", f"expected a list of {n} entries (num_hidden_layers)")
        bad = [i for i, t in enumerate(types) if t not in (0, 1)]
        if bad:
            raise ConfigError(f"attn_type_list[{bad[0]}]", f"expected 0 (linear) or 1 (softmax), got {types[bad[0]]!r}")
        return [("full", None) if t == 1 else ("lightning", None) for t in types]
    if cfg.get("full_attention_interval") is not None:  # Qwen3-Next: every k-th layer is full
        k = _get(cfg, "full_attention_interval")
        return [("full", None) if (i + 1) % k == 0 else (lin_kind, None) for i in range(n)]
    pattern = cfg.get("sliding_window_pattern")
    if pattern is not None and window is not None:  # Gemma-3: every pattern-th layer is global
        return [("full", None) if (i + 1) % pattern == 0 else ("sliding", window) for i in range(n)]
    if model_type == "gemma2" and window is not None:  # Gemma-2 alternates local/global, local first
        return [("sliding", window) if i % 2 == 0 else ("full", None) for i in range(n)]
    if window is not None and cfg.get("use_sliding_window", True):  # Mistral: every layer local
        return [("sliding", window)] * n
    return [("full", None)] * n


def _moe_layers(cfg: dict, n: int, num_experts: int) -> list[bool]:
    if not num_experts:
        return [False] * n
    first_dense = _get(cfg, "first_k_dense_replace", required=False, default=0)
    freq = _first(cfg, ("moe_layer_freq", "decoder_sparse_step"), 1)[1] or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    return [i >= first_dense and i not in dense_only and (i + 1) % freq == 0 for i in range(n)]


def parse_hf_config(cfg: dict[str, Any], name: str | None = None) -> ModelSpec:
    """Read an HF config.json dict (text config of multimodal models too) into a ModelSpec."""
    if not isinstance(cfg, dict):
        raise ConfigError("<root>", "expected a JSON object")
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type", ""))}
    model_type = str(cfg.get("model_type", ""))
    n = _get(cfg, "num_hidden_layers")
    h = _get(cfg, "hidden_size")
    heads = _get(cfg, "num_attention_heads")
    kv_heads = _get(cfg, "num_key_value_heads", required=False, default=heads)
    head_dim = _get(cfg, "head_dim", required=False, default=None)
    if head_dim is None:
        if h % heads:
            raise ConfigError("head_dim", f"missing and hidden_size {h} is not divisible by num_attention_heads {heads}")
        head_dim = h // heads
    ekey, num_experts = _first(cfg, ("num_local_experts", "num_experts", "n_routed_experts"), 0)
    num_experts = _get(cfg, ekey, required=False, default=0)
    top_k = _get(cfg, "num_experts_per_tok", required=bool(num_experts), default=0)
    if num_experts and top_k > num_experts:
        raise ConfigError("num_experts_per_tok", f"{top_k} exceeds the number of experts {num_experts}")
    moe_flags = _moe_layers(cfg, n, num_experts)
    inter = _get(cfg, "intermediate_size", required=not all(moe_flags), default=0)
    expert = _get(cfg, "moe_intermediate_size", required=False, default=inter) if num_experts else 0
    shared = 0
    if num_experts and cfg.get("n_shared_experts"):
        shared = _get(cfg, "n_shared_experts") * expert
    elif num_experts and cfg.get("shared_expert_intermediate_size"):
        shared = _get(cfg, "shared_expert_intermediate_size")
    kinds = _layer_attn_kinds(cfg, n, model_type)
    layers = [LayerSpec(a, m, w) for (a, w), m in zip(kinds, moe_flags)]
    spec = ModelSpec(
        name=name or cfg.get("_name_or_path") or model_type or "custom",
        vocab_size=_get(cfg, "vocab_size"), hidden_size=h, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=inter, layers=layers,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attn_bias=bool(cfg.get("attention_bias", False)),
        attn_output_gate=model_type == "qwen3_next", qk_norm=model_type in ("qwen3_next", "qwen3", "qwen3_moe", "gemma3", "gemma3_text"),
        sinks=model_type == "gpt_oss",
        num_experts=num_experts, top_k=top_k, expert_size=expert, shared_size=shared,
        shared_gate=bool(shared) and model_type.startswith("qwen"), expert_bias=model_type == "gpt_oss",
    )
    if any(l.attn == "gdn" for l in layers):
        spec.lin_k_heads = _get(cfg, "linear_num_key_heads")
        spec.lin_v_heads = _get(cfg, "linear_num_value_heads")
        spec.lin_k_dim = _get(cfg, "linear_key_head_dim")
        spec.lin_v_dim = _get(cfg, "linear_value_head_dim")
        spec.lin_conv = _get(cfg, "linear_conv_kernel_dim", required=False, default=4)
    if any(l.attn == "lightning" for l in layers):  # Lightning heads mirror the softmax heads
        spec.lin_k_heads = spec.lin_v_heads = heads
        spec.lin_k_dim = spec.lin_v_dim = head_dim
    if any(l.attn == "mla" for l in layers):
        spec.q_lora_rank = _get(cfg, "q_lora_rank", required=False, default=0)
        spec.kv_lora_rank = _get(cfg, "kv_lora_rank")
        spec.qk_nope_dim = _get(cfg, "qk_nope_head_dim")
        spec.qk_rope_dim = _get(cfg, "qk_rope_head_dim")
        spec.v_head_dim = _get(cfg, "v_head_dim")
    return spec


def load_model(name_or_path: str) -> ModelSpec:
    """A preset name (case-insensitive) or a path to a config.json / a directory holding one."""
    from opdisagg_rt.analysis.presets import PRESETS
    key = name_or_path.lower()
    if key in PRESETS:
        p = PRESETS[key]
        spec = parse_hf_config(p["config"], name=key)
        spec.published = p["published"]
        return spec
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"unknown model {name_or_path!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a config.json path")
    return parse_hf_config(json.loads(path.read_text()), name=path.parent.name or str(path))
