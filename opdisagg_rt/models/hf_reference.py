"""The transformers model on the weights we loaded: the reference for parity tests and the
peer in benchmarks (transformers is a test/bench dependency, imported only here)."""
from __future__ import annotations

import torch


def hf_model_from_loaded(loaded, dtype: torch.dtype = torch.float32):
    import transformers
    cfg = loaded.config
    if cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise ValueError(f"no HF reference builder for {cfg.architecture!r}")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in loaded.weights)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise ValueError(f"HF reference: missing {sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    eos = loaded.tokenizer.eos_token_ids or cfg.eos_token_ids
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos[0] if eos else 0
    return model.to(dtype)
