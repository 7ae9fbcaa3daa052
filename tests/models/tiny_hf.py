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


def run_prefill(ops, ids: list[int], block_size: int = 8, dtype=None):
    """All prefill logits of one sequence through the ops, outside the engine: KV caches (an
    identity block table) and one zeroed state slot per linear-attention op are bound here."""
    import torch

    from opdisagg_rt.models.executor import run_ops
    from opdisagg_rt.step_batch import StepBatch
    dtype = dtype or torch.float32
    n = len(ids)
    nblocks = -(-n // block_size)
    for op in ops:
        if callable(getattr(op, "bind_cache", None)):
            shape = (nblocks, block_size, op.num_kv_heads, op.head_dim)
            op.bind_cache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        if callable(getattr(op, "state_spec", None)):
            spec = op.state_spec()
            op.bind_state(torch.zeros(1, *spec.conv_shape, dtype=spec.conv_dtype),
                          torch.zeros(1, *spec.recurrent_shape))
    batch = StepBatch(["r"], torch.tensor(ids), torch.arange(n), torch.arange(n), torch.tensor([0, n]),
                      torch.tensor([n]), torch.arange(nblocks)[None], torch.arange(n), 0, [n], [n], block_size,
                      state_indices=torch.tensor([0]))
    with torch.inference_mode():
        return run_ops(ops, batch)["logits"]


def check_greedy(hf, prompts, outs, steps: int = 32, min_margin: float = 1e-3) -> None:
    """Every engine token is transformers' argmax after the same prefix (one teacher-forced
    forward), with a clear top-1/top-2 margin (else float32 noise could decide the comparison)."""
    import torch
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == steps
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
        top2 = logits.topk(2, dim=-1)
        assert out.token_ids == top2.indices[:, 0].tolist()
        margin = float((top2.values[:, 0] - top2.values[:, 1]).min())
        assert margin > min_margin, f"near-tie along the trajectory ({margin:.2e}): pick another init scale"


def same_outputs(a, b, tol: float = 1e-4) -> None:
    """The same tokens, and their log-probabilities within `tol` (requests run with logprobs=0)."""
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        lx = [lp[t] for lp, t in zip(x.logprobs, x.token_ids)]
        ly = [lp[t] for lp, t in zip(y.logprobs, y.token_ids)]
        assert max(abs(p - q) for p, q in zip(lx, ly)) < tol


def check_state_model_engine(make_engine, hf, prompts, params, caplog, chunk_tokens: int, small_kw: dict) -> None:
    """The engine checks of a linear-attention family (MiniMax, Qwen3-Next): prefix caching off
    with a logged reason; greedy tokens alone are transformers'; batched, a repeated prompt (a
    would-be prefix hit), chunked prefill (`chunk_tokens` per step, cutting the layers' chunks
    anywhere) and a run forced into preemption (`small_kw`: 3 state slots and 14 KV blocks, fewer
    than the prompts need) give the same tokens; every state slot is returned."""
    import logging
    with caplog.at_level(logging.WARNING):
        engine = make_engine()
    assert not engine.kv.enable_prefix_caching and "linear-attention" in engine.kv.prefix_caching_disabled_reason
    assert "prefix caching disabled" in caplog.text
    alone = [engine.generate([p], params, use_tqdm=False)[0] for p in prompts]
    check_greedy(hf, prompts, alone, params.max_tokens)
    same_outputs(engine.generate(prompts, params, use_tqdm=False), alone)
    again = engine.generate([prompts[2], prompts[2]], params, use_tqdm=False)
    same_outputs(again, [alone[2], alone[2]])
    assert engine.kv.state_pool.num_free == engine.kv.state_pool.num_slots
    del engine
    chunked = make_engine(max_num_batched_tokens=chunk_tokens)
    same_outputs(chunked.generate(prompts, params, use_tqdm=False), alone)
    del chunked
    small = make_engine(**small_kw)
    assert small.runner.num_blocks == 14
    same_outputs(small.generate(prompts, params, use_tqdm=False), alone)
    assert small.scheduler.num_preemptions > 0
