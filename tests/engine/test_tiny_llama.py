"""Parity on a tiny random HF Llama checkpoint: untied head, GQA, Llama-3 RoPE scaling."""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.engine import Engine
from opdisagg_rt.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


def test_tiny_llama_greedy_matches_hf(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, dtype="float32", kv_cache_memory=8 << 20, block_size=8)
    assert engine.model_config.rope_scaling["rope_type"] == "llama3"
    assert not engine.model_config.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, engine.model_config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 40)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        seq = prompt + out.token_ids
        with torch.inference_mode():
            logits = hf(torch.tensor([seq])).logits[0]
        # Each greedy token must be HF's argmax at that position; random weights make near-ties,
        # so a different choice is only allowed where HF's top-2 logits are within 1e-4.
        for i, tok in enumerate(out.token_ids):
            row = logits[len(prompt) + i - 1]
            top2 = row.topk(2)
            if tok != int(top2.indices[0]):
                assert float(top2.values[0] - row[tok]) < 1e-4, (i, tok, top2)
        assert len(out.token_ids) == 48


def test_bench_repeats_alternate_with_hf_and_report_medians(tiny_llama_dir, capsys):
    from opdisagg_rt import bench
    r = bench.main(["--model", tiny_llama_dir, "--num-requests", "3", "--input-len", "40", "--output-len", "4",
                    "--dtype", "float32", "--compare", "hf", "--repeats", "3"])
    eng, hf = r["engine"], r["peers"]["hf"]
    assert len(eng["throughput_tok_s_runs"]) == len(hf["throughput_tok_s_runs"]) == 3
    # each side reports its median run, and the ratio is of those medians
    assert eng["throughput_tok_s"] == sorted(eng["throughput_tok_s_runs"])[1]
    assert hf["throughput_tok_s"] == sorted(hf["throughput_tok_s_runs"])[1]
    assert r["ratio_vs_hf"] == eng["throughput_tok_s"] / hf["throughput_tok_s"]
    assert len(r["ratio_vs_hf_per_round"]) == 3
    # every round prefills its prompts: no prefix-cache hits from an earlier round's prompts
    assert all(run["prefix_cache_hit_tokens"] == 0 for run in r["runs"]["engine"])
    assert "per round" in capsys.readouterr().out


def test_each_engine_runs_with_its_own_thread_count(tiny_llama_dir):
    # torch's thread count is per process: a second engine (a bench peer) must not change the
    # first one's (the disaggregated engine process runs with 1 thread while its stages compute).
    import torch

    from opdisagg_rt.engine import Engine
    from opdisagg_rt.sampling import SamplingParams
    before = torch.get_num_threads()
    try:
        one = Engine(tiny_llama_dir, dtype="float32", num_threads=1)
        two = Engine(tiny_llama_dir, dtype="float32", num_threads=2)
        params = SamplingParams(temperature=0, max_tokens=2)
        one.generate([[5, 6, 7]], params, use_tqdm=False)
        assert torch.get_num_threads() == 1
        two.generate([[5, 6, 7]], params, use_tqdm=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
