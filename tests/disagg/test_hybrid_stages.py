"""A different placement for sliding-window and full-attention layers, run for real: Gemma-3
(5 sliding : 1 full, six KV cache groups sharing one block pool) with its sliding-window attention
on one stage worker and its full attention (and everything else) on another gives the colocated
engine's greedy tokens (float32), decoding far past the window while the engine frees the
blocks that fell out of it."""
from __future__ import annotations

import pytest

from opdisagg_rt.engine import Engine
from opdisagg_rt.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

WINDOW, BLOCK = 8, 4


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> str:
    import torch

    from tests.conftest import _tiny_tokenizer
    out = str(tmp_path_factory.mktemp("tiny-gemma3-disagg"))
    cfg = transformers.Gemma3TextConfig(
        vocab_size=_tiny_tokenizer(out), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=WINDOW, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.25, architectures=["Gemma3ForCausalLM"])
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # HF inits the (1 + w) norms at w = 0: make the stages' norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    return out


def test_sliding_and_full_attention_on_different_stages(gemma3_dir):
    kw = dict(dtype="float32", block_size=BLOCK, kv_cache_memory=4 << 20, num_threads=1, max_model_len=256,
              max_num_batched_tokens=24)
    prompts = [[5 + (i * 7 + j) % 200 for j in range(n)] for i, n in enumerate((5, 19, 33))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    colocated = Engine(gemma3_dir, **kw)
    sliding = [op.name for op in colocated.runner.attn_ops if op.window]
    full = [op.name for op in colocated.runner.attn_ops if not op.window]
    assert len(sliding) == 5 and len(full) == 1 and colocated.runner.num_groups > 1
    ref = colocated.generate(prompts, params, use_tqdm=False)
    want = [o.token_ids for o in ref]
    names = [op.name for op in colocated.runner.ops]
    spec = {"stages": {"swa": {"device": "cpu", "threads": 1, "ops": sliding},
                       "rest": {"device": "cpu", "threads": 1, "ops": [n for n in names if n not in sliding]}},
            "micro_batches": 2}
    engine = Engine(gemma3_dir, stage_spec=spec, **kw)
    try:
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert all(o.error is None for o in outs), [o.error for o in outs]
        assert [o.token_ids for o in outs] == want
        for got, exp in zip(outs, ref):  # the same numbers, not only the same argmax (float32: 1e-4)
            for a, b in zip(got.logprobs, exp.logprobs):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
        assert engine.kv.num_window_freed_blocks > 0  # the engine frees blocks outside the windows
        assert engine.runner.memory["swa"]["attn_layers"] == 5 and engine.runner.memory["rest"]["attn_layers"] == 1
    finally:
        engine.shutdown()
