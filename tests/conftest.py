"""Shared fixtures: the embedded SmolLM2 GGUF and tiny random Llama checkpoints."""
from __future__ import annotations

import json

import pytest

TINY_SPECIALS = ["<unk>", "<s>", "</s>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from opdisagg_rt.models.default import default_model_path

    return default_model_path()


def _tiny_tokenizer(out_dir: str) -> int:
    """Train a byte-level BPE on a few lines; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 42\n",
              "Hello, world! 1234567890", "Ünïcödé and emoji 🙂 too"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # BOS like Llama-3's tokenizer.json: added by the post-processor
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(f"{out_dir}/tokenizer.json")
    with open(f"{out_dir}/tokenizer_config.json", "w") as f:
        eos = {"__type": "AddedToken", "content": "</s>", "special": True}  # the dict spelling
        json.dump({"bos_token": "<s>", "eos_token": eos,
                   "unk_token": "<unk>", "chat_template": TINY_CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tok.get_vocab_size()


@pytest.fixture
def tiny_llama_dir(tmp_path, request) -> str:
    """A random LlamaForCausalLM (2 layers, GQA, untied, Llama-3 RoPE) saved by transformers.

    `request.param` (indirect parametrization) goes to `save_pretrained`, e.g. a
    `max_shard_size` to get a sharded checkpoint.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = str(tmp_path / "tiny-llama")
    (tmp_path / "tiny-llama").mkdir()
    vocab = _tiny_tokenizer(out)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, **getattr(request, "param", {}))
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 0]).save_pretrained(out)
    return out
