"""Sliding-window families against transformers in float32: Mistral (every layer windowed, one KV
cache group) and Gemma-3 text (5 sliding : 1 full, six KV cache groups sharing one block pool).

Tiny random checkpoints are made with transformers in a tmp dir. Weights are drawn with a large
init scale (initializer_range 0.25) so the top-1/top-2 logit margins dwarf float32 noise, and
the test checks that margin (> 5e-4) before trusting a greedy comparison. Tolerances: logits
within 2e-4 absolute of transformers' (float32, different summation order; observed <= 3e-5).
Windows are 8 tokens with block_size 4: prompts and decodes run 4-8x past the window.
"""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.cache.block_pool import NULL_BLOCK
from opdisagg_rt.engine import Engine
from opdisagg_rt.sampling import SamplingParams
from tests.conftest import _tiny_tokenizer

transformers = pytest.importorskip("transformers")

WINDOW, BLOCK = 8, 4
LOGIT_ATOL = 2e-4  # observed max |engine - HF| is ~3e-5
MIN_MARGIN = 5e-4  # HF's top-1/top-2 gap along each compared greedy path (> 2x LOGIT_ATOL)


def _save(model, out: str) -> str:
    model.save_pretrained(out)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny-mistral"))
    vocab = _tiny_tokenizer(out)
    cfg = transformers.MistralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, initializer_range=0.25)
    torch.manual_seed(0)
    return _save(transformers.MistralForCausalLM(cfg), out)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny-gemma3"))
    vocab = _tiny_tokenizer(out)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.25,
        final_logit_softcapping=30.0, architectures=["Gemma3ForCausalLM"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # HF inits the (1 + w) norms at w = 0: give them something to get right
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return _save(model, out)


FAMILIES = ["mistral_dir", "gemma3_dir"]


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_check(hf, prompt: list[int], toks: list[int]) -> torch.Tensor:
    """One teacher-forced HF forward over prompt + toks: each engine token must be HF's argmax
    after the same prefix (so the greedy paths are identical) with a clear top-1/top-2 margin.
    Returns HF's logits at the positions that chose the tokens [len(toks), V]."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:len(prompt) + len(toks) - 1]
    assert logits.argmax(-1).tolist() == toks
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > MIN_MARGIN  # the comparison is meaningful
    return logits


def _engine(path, **kw) -> Engine:
    # one thread: tiny GEMMs, and the test machine is shared
    args = dict(dtype="float32", kv_cache_memory=4 << 20, block_size=BLOCK, max_num_batched_tokens=512,
                num_threads=1)
    args.update(kw)
    return Engine(path, **args)


def _capture(engine: Engine) -> list[torch.Tensor]:
    """Record every step's logits (rows in scheduled order)."""
    seen: list[torch.Tensor] = []
    run = engine.runner.execute

    def execute(batch):
        out = run(batch)
        seen.append(out.clone())
        return out

    engine.runner.execute = execute
    return seen


def _prompts(vocab: int, lens=(5, 13, 30), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _sliding_groups(engine: Engine) -> list[int]:
    return [g for g, w in enumerate(engine.kv.windows) if w is not None]


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_and_capacity(family, request):
    path = request.getfixturevalue(family)
    engine = _engine(path)
    spec = engine.runner.kv_spec
    one_layer = 2 * BLOCK * 2 * 16 * 4  # K and V of one layer's block: 2 kv heads x 16 dims, fp32
    if family == "mistral_dir":
        assert [g.window for g in spec.groups] == [WINDOW]
        assert engine.runner.block_bytes() == 2 * one_layer  # both layers in the one group
    else:  # 5 sliding + 1 full, gcd 1: six one-layer groups, full first, sharing block ids
        assert [g.window for g in spec.groups] == [None] + [WINDOW] * 5
        assert [len(g.layer_names) for g in spec.groups] == [1] * 6
        assert engine.runner.block_bytes() == one_layer
        assert engine.runner.num_blocks == (4 << 20) // one_layer
    assert engine.kv.enable_prefix_caching  # kept: a hit needs only the window's blocks
    with pytest.raises(ValueError, match="kv_store is not supported"):
        _engine(path, kv_store="cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_and_greedy_alone_and_batched(family, request):
    path = request.getfixturevalue(family)
    hf = _hf(path)
    engine = _engine(path)
    prompts = _prompts(engine.model_config.vocab_size)
    # alone: every step's logits (prefill row, then each decode) match HF's at that position
    alone = []
    for prompt in prompts:
        seen = _capture(engine)
        out = engine.generate([prompt], _greedy(32), use_tqdm=False)[0]
        engine.runner.execute = type(engine.runner).execute.__get__(engine.runner)
        logits = _hf_check(hf, prompt, out.token_ids)
        got = torch.cat(seen)
        assert got.shape == logits.shape == (32, engine.model_config.vocab_size)
        assert torch.allclose(got, logits, atol=LOGIT_ATOL, rtol=0), float((got - logits).abs().max())
        alone.append(out.token_ids)
    # batched, prompts of different lengths (a prompt of 30 > window, decodes mixed with prefills)
    outs = engine.generate(prompts, _greedy(32), use_tqdm=False)
    assert [o.token_ids for o in outs] == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_shot(family, request):
    path = request.getfixturevalue(family)
    prompts = _prompts(300, lens=(29, 23))
    one = _engine(path)
    ref_logits = []
    for p in prompts:
        seen = _capture(one)
        one.generate([p], _greedy(12), use_tqdm=False)
        ref_logits.append(torch.cat([s for s in seen if s.shape[0]]))
        one.runner.execute = type(one.runner).execute.__get__(one.runner)
    ref = [o.token_ids for o in one.generate(prompts, _greedy(12), use_tqdm=False)]
    for chunk in (5, 6, 7):  # chunk edges at every offset around the window edge (8) and blocks (4)
        eng = _engine(path, max_num_batched_tokens=chunk)
        for p, want in zip(prompts, ref_logits):
            seen = _capture(eng)
            eng.generate([p], _greedy(12), use_tqdm=False)
            eng.runner.execute = type(eng.runner).execute.__get__(eng.runner)
            got = torch.cat([s for s in seen if s.shape[0]])
            assert sum(1 for s in seen if not s.shape[0]) >= len(p) // chunk - 1  # really chunked
            assert torch.allclose(got, want, atol=1e-4, rtol=0), (chunk, float((got - want).abs().max()))
        outs = eng.generate(prompts, _greedy(12), use_tqdm=False)  # chunked and batched
        assert [o.token_ids for o in outs] == ref, chunk


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_far_past_window_frees_blocks(family, request):
    path = request.getfixturevalue(family)
    hf = _hf(path)
    engine = _engine(path)
    prompt = _prompts(engine.model_config.vocab_size, lens=(10,), seed=3)[0]
    n = 56  # 66 tokens in all: 8x the window
    rid = engine.add_request(prompt, _greedy(n))
    sliding = _sliding_groups(engine)
    bound = -(-WINDOW // BLOCK) + 1  # blocks a decoding sequence holds per window group
    got, peak = [], 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            got = o.token_ids
        if rid in engine.kv.req_blocks:
            live = [engine.kv.num_live_blocks(rid, g) for g in sliding]
            peak = max(peak, *live)
            blocks = engine.kv.group_blocks[sliding[0]][rid]
            # freed blocks are exactly the leading ones below the window
            req = engine.scheduler.requests[rid]
            first_live = max(req.num_computed_tokens - 1 - WINDOW + 1, 0) // BLOCK
            assert all(b is NULL_BLOCK for b in blocks[:first_live])
    _hf_check(hf, prompt, got)
    assert len(got) == n and peak <= bound
    # the last allocation saw num_computed = prompt + n - 2 tokens: every block below the first
    # live key (num_computed - window + 1) went back to the pool, in each sliding group
    expected = (len(prompt) + n - 2 - WINDOW + 1) // BLOCK
    assert expected >= 12
    assert engine.kv.num_window_freed_blocks == expected * len(sliding)
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks  # all back after finishing


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_with_windows_match_recompute(family, request):
    """Prompts sharing 26-33 tokens (> window): with prefix caching, later requests hit blocks
    of every group (only the window's blocks in sliding groups) and still decode exactly as
    without the cache."""
    path = request.getfixturevalue(family)
    base = _prompts(300, lens=(34,), seed=5)[0]
    prompts = [base[:26] + [5, 6, 7], base[:30] + [9], base, base[:33] + [11, 12, 13, 14]]
    cached = _engine(path)
    cold = _engine(path, enable_prefix_caching=False)
    want = [o.token_ids for o in cold.generate(prompts, _greedy(16), use_tqdm=False)]
    outs = []
    for p in prompts:  # one at a time: each finds its predecessors' blocks
        outs += cached.generate([p], _greedy(16), use_tqdm=False)
    assert [o.token_ids for o in outs] == want
    hits = [o.metrics.num_cached_tokens for o in outs]
    assert hits[0] == 0 and all(h >= 24 for h in hits[1:]), hits


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_runs_on_the_tiny_checkpoint(family, request):
    from tests.models.tiny_hf import check_bench_runs
    check_bench_runs(request.getfixturevalue(family))
