"""`load_model(path)`: one entry point for GGUF files and HF checkpoint directories.

Both loaders hand back float32 tensors under transformers' Llama names, a ModelConfig and a
Tokenizer; this module dispatches, checks Llama names/shapes, and fingerprints the weights.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ModelConfig
from ..tokenizer import Tokenizer
from . import gguf_loader, hf_loader
from .default import default_model_path

# Architectures whose weights follow the Llama layout checked below.
SUPPORTED_LLAMA_ARCHS = frozenset({"LlamaForCausalLM", "MistralForCausalLM"})


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # float32, transformers names
    tokenizer: Tokenizer
    fingerprint: str  # hex sha256 identifying the weights (KV store keys)
    source: str  # the path the model came from
    # GGUF Q4_1/Q8_0 matrices in their file form, {name: (kind, uint8 blocks)}: bf16 decode
    # projections stream these (same bf16 values as `weights`, fewer bytes); empty otherwise.
    gguf_blocks: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)


def load_model(path: str | None = None) -> LoadedModel:
    """Load a `.gguf` file or an HF directory (config.json + safetensors); None = default model."""
    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        config, weights, tokenizer, blocks = gguf_loader.load_gguf(path)
        describe = lambda n: f"{n} ({gguf_loader.gguf_name(n)} in the GGUF)"  # noqa: E731
        files = [path]
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        config, weights, tokenizer, files = hf_loader.load_hf_dir(path)
        blocks = {}
        describe = str
    elif not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    else:
        raise ValueError(f"{path}: expected a .gguf file or a directory with config.json")
    if config.architecture in SUPPORTED_LLAMA_ARCHS:
        check_llama_weights(config, weights, path, describe)
    return LoadedModel(config, weights, tokenizer, fingerprint(files), path, blocks)


def llama_tensor_shapes(c: ModelConfig, with_bias: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama-family decoder with config `c` needs, with its shape."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                          "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = {"q_proj": (q, c.hidden_size), "k_proj": (kv, c.hidden_size),
                "v_proj": (kv, c.hidden_size), "o_proj": (c.hidden_size, q)}
        for name, shape in attn.items():
            shapes[f"{p}self_attn.{name}.weight"] = shape
            if with_bias and name != "o_proj":
                shapes[f"{p}self_attn.{name}.bias"] = shape[:1]
        shapes[f"{p}mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[f"{p}mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[f"{p}mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
        shapes[f"{p}input_layernorm.weight"] = (c.hidden_size,)
        shapes[f"{p}post_attention_layernorm.weight"] = (c.hidden_size,)
    return shapes


def check_llama_weights(config: ModelConfig, weights: dict[str, torch.Tensor], source: str,
                        describe: Callable[[str], str] = str) -> None:
    """Raise ValueError naming the first missing or wrongly shaped tensor."""
    with_bias = "model.layers.0.self_attn.q_proj.bias" in weights
    for name, shape in llama_tensor_shapes(config, with_bias).items():
        if name not in weights:
            raise ValueError(f"{source}: missing tensor {describe(name)}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{source}: tensor {describe(name)} has shape "
                             f"{tuple(weights[name].shape)}, expected {shape} from the config")


_SAMPLES, _SAMPLE_BYTES, _HEAD_BYTES = 64, 1 << 16, 1 << 20


def fingerprint(files: list[str]) -> str:
    """sha256 over each file's size, first MiB and 64 evenly spaced 64 KiB samples.

    Content-based (not mtime) so engines on different machines holding copies of the same
    model share KV-store keys; sampled so that it costs milliseconds even for 100 GB models.
    File names are left out (a renamed copy is the same model); `files` come sorted by name.
    """
    h = hashlib.sha256(b"opdisagg-fingerprint-v1")
    for path in sorted(files):
        size = os.path.getsize(path)
        h.update(f"{size}\0".encode())
        with open(path, "rb") as f:
            if size <= _HEAD_BYTES + _SAMPLES * _SAMPLE_BYTES:
                h.update(f.read())
                continue
            h.update(f.read(_HEAD_BYTES))
            step = (size - _HEAD_BYTES - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for k in range(_SAMPLES):
                f.seek(_HEAD_BYTES + k * step)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()
