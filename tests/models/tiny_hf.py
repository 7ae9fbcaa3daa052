"""Helpers shared by the tiny-checkpoint family tests (tests/models)."""
from __future__ import annotations

import json


def plain_bpe_tokenizer(out: str) -> int:
    """A byte-level BPE without post-processor (no BOS added), saved to `out`; its vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(f"{out}/tokenizer.json")
    with open(f"{out}/tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tok.get_vocab_size()


def check_bench_runs(path: str) -> dict:
    """`python -m opdisagg_rt.bench --model DIR` on a tiny checkpoint (issue 5: the bench runs any
    of the families): a short run must finish every request with all its tokens."""
    from opdisagg_rt import bench
    r = bench.main(["--model", path, "--num-requests", "3", "--input-len", "12", "--output-len", "4",
                    "--dtype", "float32", "--max-num-seqs", "4"])
    assert r["engine"]["output_tokens"] == 3 * 4, r["engine"]
    assert r["engine"]["throughput_tok_s"] > 0
    return r
