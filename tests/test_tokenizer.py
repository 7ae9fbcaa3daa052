"""Tokenizer parity with transformers: SmolLM2's GGUF metadata and an HF tokenizer.json."""
from __future__ import annotations

import os

import pytest

from opdisagg_rt.models.gguf_loader import GGUFFile
from opdisagg_rt.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Digits: 0 12 345 6789 3.14159 1,000,000",
    "tabs\tand   runs of     spaces\n\n\nand newlines   ",
    "  leading and trailing  ",
    "Ünïcödé: naïve café, 日本語のテキスト, русский, عربى",
    "emoji 🙂👍🏽 and 🇫🇷 flags",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|>",
    "I'm sure they've done it; we'll see what's what",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke 🙂"}],
]


@pytest.fixture(scope="session")
def gguf_tokenizers(smollm2_path):
    """(ours, transformers') for the SmolLM2 GGUF; transformers' takes ~15 s to build."""
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_gguf_metadata(GGUFFile(smollm2_path).metadata, source=smollm2_path)
    ref = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
    return ours, ref


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_parity(gguf_tokenizers, text):
    ours, ref = gguf_tokenizers
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == ref.encode(text, add_special_tokens=special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip)


def test_gguf_special_tokens(gguf_tokenizers):
    ours, ref = gguf_tokenizers
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_id == ref.eos_token_id == 2
    assert ours.eos_token_ids == [2]
    assert ours.vocab_size == len(ref) == 49152
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)
    ids = ours.encode("<|im_start|>assistant")
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_gguf_chat_template_parity(gguf_tokenizers, messages, gen):
    ours, ref = gguf_tokenizers
    expected = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_hf_dir_tokenizer_parity(tiny_llama_dir):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_hf_dir(tiny_llama_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    for text in TEXTS + ["<s>already</s> special"]:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), text
            assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)


def test_chat_template_raise_exception(tiny_llama_dir):
    tok = Tokenizer.from_hf_dir(tiny_llama_dir)
    with pytest.raises(ValueError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_unsupported_gguf_tokenizer_model():
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "rwkv"}, source="x.gguf")
