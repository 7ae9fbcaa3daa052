"""Every knob in one place: the model's shape (ModelConfig) and the engine's (EngineConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder, in transformers' field names.

    Loaders fill it from a GGUF header or an HF config.json; `hf_config` keeps the raw dict so
    later architectures (hybrid attention, MoE) can read their own fields.
    """

    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor", ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineConfig:
    model: str | None = None  # path to a .gguf file or an HF directory; None = embedded SmolLM2
    dtype: str = "bfloat16"
    max_model_len: int | None = None  # None: min(model's max positions, 8192)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: float | int = 0.25  # bytes (int > 1) or fraction of free RAM (float <= 1)
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    seed: int = 0
