"""Built-in models: the cost-relevant fields of each published config.json, verbatim field names.

`published` holds the vendor's parameter counts and what their "active" count includes:
  "all"        every parameter a token touches, embedding row and lm_head included (Mistral AI)
  "lm_head"    non-embedding parameters plus the unembedding (OpenAI gpt-oss model card)
  "non_embed"  neither the embedding nor the lm_head (MiniMax, Qwen)
`active_rounding`: half-width of the rounding interval when the vendor publishes only 1-2
significant digits ("3B", "37B"); the count must then fall inside that interval.
Dense models publish a total only; their active count is the total.
"""
from __future__ import annotations

_LLAMA = {"model_type": "llama", "vocab_size": 128256, "tie_word_embeddings": False}

PRESETS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M config.json; 134,515,008 params (safetensors header, rounded "135M")
    "smollm2-135m": {"config": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                                "num_key_value_heads": 3, "tie_word_embeddings": True},
                     "published": {"total": 134.5e6}},
    # meta-llama/Meta-Llama-3-8B config.json; model card "8.03B"
    "llama-3-8b": {"config": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                              "num_attention_heads": 32, "num_key_value_heads": 8},
                   "published": {"total": 8.03e9}},
    # meta-llama/Meta-Llama-3-70B config.json; model card "70.6B"
    "llama-3-70b": {"config": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                               "num_attention_heads": 64, "num_key_value_heads": 8},
                    "published": {"total": 70.6e9}},
    # mistralai/Mistral-7B-v0.1 config.json; model card / paper "7.24B"
    "mistral-7b": {"config": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
                              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "sliding_window": 4096, "tie_word_embeddings": False},
                   "published": {"total": 7.24e9}},
    # mistralai/Mixtral-8x7B-v0.1 config.json; Mixtral paper: 46.7B total, 12.9B active (embeddings included)
    "mixtral-8x7b": {"config": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
                                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                                "sliding_window": None, "tie_word_embeddings": False},
                     "published": {"total": 46.7e9, "active": 12.9e9, "active_counts": "all"}},
    # google/gemma-2-9b config.json; model page 9.24B (safetensors)
    "gemma-2-9b": {"config": {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584,
                              "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                              "num_key_value_heads": 8, "head_dim": 256, "sliding_window": 4096,
                              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                              "tie_word_embeddings": True},
                   "published": {"total": 9.24e9}},
    # google/gemma-3-27b-it config.json text_config; Gemma 3 report table 1: 1,416M embedding +
    # 25,600M non-embedding (the 417M SigLIP vision encoder is not modelled)
    "gemma-3-27b": {"config": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 5376,
                               "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
                               "num_key_value_heads": 16, "head_dim": 128, "sliding_window": 1024,
                               "sliding_window_pattern": 6, "tie_word_embeddings": True},
                    "published": {"total": 27.016e9}},
    # openai/gpt-oss-20b config.json; model card table: 20.91B total, 3.61B active
    "gpt-oss-20b": {"config": {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
                               "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
                               "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
                               "num_experts_per_tok": 4, "sliding_window": 128, "attention_bias": True,
                               "layer_types": ["sliding_attention", "full_attention"] * 12,
                               "tie_word_embeddings": False},
                    "published": {"total": 20.91e9, "active": 3.61e9, "active_counts": "lm_head"}},
    # openai/gpt-oss-120b config.json; model card table: 116.83B total, 5.13B active
    "gpt-oss-120b": {"config": {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
                                "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
                                "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128,
                                "num_experts_per_tok": 4, "sliding_window": 128, "attention_bias": True,
                                "layer_types": ["sliding_attention", "full_attention"] * 18,
                                "tie_word_embeddings": False},
                     "published": {"total": 116.83e9, "active": 5.13e9, "active_counts": "lm_head"}},
    # Qwen/Qwen3-Next-80B-A3B-Instruct config.json (= transformers' Qwen3NextConfig defaults);
    # model card "80B in total and 3B activated": one significant digit, see tests
    "qwen3-next-80b-a3b": {"config": {"model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048,
                                      "intermediate_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 16,
                                      "num_key_value_heads": 2, "head_dim": 256, "full_attention_interval": 4,
                                      "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
                                      "linear_value_head_dim": 128, "linear_num_key_heads": 16,
                                      "linear_num_value_heads": 32, "num_experts": 512, "num_experts_per_tok": 10,
                                      "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                                      "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False},
                           "published": {"total": 80e9, "active": 3e9, "active_counts": "non_embed",
                                         "active_rounding": 0.5e9}},
    # MiniMaxAI/MiniMax-Text-01 config.json; MiniMax-01 report: 456B total, 45.9B activated
    "minimax-text-01": {"config": {"model_type": "minimax_text_01", "vocab_size": 200064, "hidden_size": 6144,
                                   "intermediate_size": 9216, "num_hidden_layers": 80, "num_attention_heads": 64,
                                   "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 32,
                                   "num_experts_per_tok": 2, "attn_type_list": ([0] * 7 + [1]) * 10,
                                   "tie_word_embeddings": False},
                        "published": {"total": 456e9, "active": 45.9e9, "active_counts": "non_embed"}},
    # deepseek-ai/DeepSeek-V3 config.json (inference/configs/config_671B.json); report: 671B total,
    # 37B activated, both without the 14B MTP module; "37B" is 2 significant digits, see tests
    "deepseek-v3": {"config": {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
                               "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                               "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
                               "n_routed_experts": 256, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                               "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
                               "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                               "tie_word_embeddings": False},
                    "published": {"total": 671e9, "active": 37e9, "active_counts": "lm_head", "active_rounding": 0.5e9}},
}
