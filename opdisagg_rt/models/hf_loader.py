"""HF checkpoint directory loader: config.json, safetensors (single or sharded), tokenizer.

Returns every tensor of the checkpoint (as float32, under its own name), so architectures
beyond Llama (MoE, hybrid) find theirs; the model builder picks the names it needs.
Only safetensors are read: `pytorch_model.bin` would mean unpickling.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..tokenizer import Tokenizer

_INDEX = "model.safetensors.index.json"
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "gpt_oss": "GptOssForCausalLM"}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` pair. Default RoPE maps to rope_scaling=None."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        # hybrid models keep one set per layer type ({"full_attention": {...}, ...}); the
        # full-attention one is the model-wide default, the raw dict stays in hf_config
        params = dict(params.get("full_attention") or next(iter(params.values())))
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if "type" in params and "rope_type" not in params:  # pre-4.45 spelling
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def hf_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    cfg = _read_json(cfg_path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(cfg.get("model_type", ""))
    if not arch:
        raise ValueError(f"{cfg_path}: missing field 'architectures'")

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ValueError(f"{cfg_path}: missing field {key!r} (architecture {arch})")
        return cfg[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    theta, scaling = _rope(cfg)
    eos = _ids(cfg.get("eos_token_id"))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):  # generation_config often lists more stop ids (<|eot_id|>...)
        eos += _ids(_read_json(gen_path).get("eos_token_id"))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos)),
        hf_config=cfg,
    )


def weight_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint, and the index's tensor -> file map if sharded."""
    index_path = os.path.join(path, _INDEX)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: missing field 'weight_map'")
        files = sorted({os.path.join(path, f) for f in weight_map.values()})
        for f in files:
            if not os.path.isfile(f):
                raise ValueError(f"{index_path}: shard {os.path.basename(f)} not found")
        return files, weight_map
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights (pickled .bin files are not loaded)")
    return files, None


def load_hf_dir(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, list[str]]:
    """Config, every tensor as float32, tokenizer, and the files that define the weights."""
    config = hf_config(path)
    files, weight_map = weight_files(path)
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(torch.float32)
    if weight_map is not None:  # the index promises tensors: a shard that lacks one is broken
        for name, shard in weight_map.items():
            if name not in weights:
                raise ValueError(f"{os.path.join(path, shard)}: missing tensor {name} "
                                 f"(listed in {_INDEX})")
    if config.tie_word_embeddings:
        # some exporters save the tied copy; consumers expect it absent when tied
        weights.pop("lm_head.weight", None)
    tokenizer = Tokenizer.from_hf_dir(path, extra_eos_token_ids=config.eos_token_ids)
    return config, weights, tokenizer, [os.path.join(path, "config.json"), *files]
