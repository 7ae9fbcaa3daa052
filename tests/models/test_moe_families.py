"""MoE: the `layers.{i}.moe` op against a naive per-token reference and transformers' MoE
blocks, attention sinks in the prefill path, and the MoE families end to end (Mixtral,
Qwen3-MoE, gpt-oss, plus Qwen2-MoE) on tiny random checkpoints saved by transformers, in float32.

Tolerances (float32): MoE op vs float64 reference 1e-5 abs; MoE op vs transformers' block
2e-5 abs; prefill logits vs transformers 2e-5 abs (logits up to ~3.5; measured <= 3e-6); in
bf16, the distance to the float32 logits at most 1.5x transformers' bf16 distance + 0.02 (measured
~1.0x: 0.04 Mixtral, 0.34 Qwen3-MoE, 0.90 gpt-oss with their random norms/sinks); greedy tokens
identical (the init scale is raised so that transformers' top-1/top-2 margin along every
compared trajectory is >= 1e-3, checked, far above the float32 noise of ~1e-5).
"""
from __future__ import annotations

import copy

import pytest
import torch

from opdisagg_rt import ops as C
from opdisagg_rt.config import ModelConfig
from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.layers.moe import Experts, MoEOp, Router, RouterConfig, SharedExpert, moe_reference
from opdisagg_rt.layers.paged_attention import paged_attention
from opdisagg_rt.models.moe_models import _moe_op
from opdisagg_rt.step_batch import StepBatch

transformers = pytest.importorskip("transformers")

H = 64
MIN_MARGIN = 1e-3


# ---- the MoE op -------------------------------------------------------------------------------

VARIANTS = {
    # name: (router config, router bias, activation, expert biases, shared expert, shared gate)
    "softmax_topk_renorm": (RouterConfig(2, renormalize=True), False, "silu", False, False, False),
    "softmax_topk": (RouterConfig(3, renormalize=False), False, "silu", False, False, False),
    "shared_expert_gated": (RouterConfig(2, renormalize=False), False, "silu", False, True, True),
    "gpt_oss": (RouterConfig(2, softmax_after_topk=True), True, "swiglu_oai", True, False, False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_op_matches_naive_reference(variant):
    cfg, rbias, act, ebias, shared, shared_gate = VARIANTS[variant]
    g = torch.Generator().manual_seed(1)
    e, h, inter, t = 8, 32, 24, 37
    rnd = lambda *s, scale=0.3: torch.randn(*s, generator=g) * scale  # noqa: E731
    x = rnd(t, h, scale=1.0)
    rw, rb = rnd(e, h), rnd(e) if rbias else None
    gu, dn = rnd(e, 2 * inter, h), rnd(e, h, inter)
    gub, dnb = (rnd(e, 2 * inter), rnd(e, h)) if ebias else (None, None)
    sh = (rnd(inter, h), rnd(inter, h), rnd(h, inter), rnd(1, h) if shared_gate else None) if shared else None
    op = MoEOp("layers.0.moe", Router("layers.0.moe.router", rw, cfg, rb),
               Experts("layers.0.moe.experts", gu, dn, gub, dnb, activation=act, alpha=1.702, limit=1.5),
               SharedExpert(*sh) if shared else None)
    got = op.moe(x)
    want = moe_reference(x, rw, rb, cfg, gu, dn, gub, dnb, act, alpha=1.702, limit=1.5)
    if shared:
        gate, up, down, sg = (s.double() for s in sh)
        xd = x.double()
        want += torch.sigmoid(xd @ sg.T) * ((torch.nn.functional.silu(xd @ gate.T) * (xd @ up.T)) @ down.T)
    assert (got.double() - want).abs().max() < 1e-5
    # the residual stream contract of `layers.{i}.moe`
    assert op.reads == ("hidden", "residual") and op.writes == ("residual",)
    tens = {"hidden": x, "residual": torch.ones(t, h)}
    op.forward(tens, None)
    assert torch.allclose(tens["residual"], 1 + got)
    assert any(k.startswith("router.") for k in op.parameters()) and any(k.startswith("experts.") for k in op.parameters())
    assert op.moe(x[:0]).shape == (0, h)  # empty step


def _block_and_config(family: str):
    """A transformers MoE block with random weights at a visible scale, and our ModelConfig."""
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                  num_hidden_layers=1, intermediate_size=24, num_experts_per_tok=2)
    if family == "mixtral":
        hf_cfg = transformers.MixtralConfig(num_local_experts=6, **common)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg)
        arch = "MixtralForCausalLM"
    elif family == "qwen3_moe":
        hf_cfg = transformers.Qwen3MoeConfig(num_experts=6, moe_intermediate_size=16, norm_topk_prob=False, **common)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg)
        arch = "Qwen3MoeForCausalLM"
    elif family == "qwen2_moe":
        hf_cfg = transformers.Qwen2MoeConfig(num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=20,
                                             norm_topk_prob=True, **common)
        block = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(hf_cfg)
        arch = "Qwen2MoeForCausalLM"
    else:
        hf_cfg = transformers.GptOssConfig(num_local_experts=6, swiglu_limit=1.0, **common)
        block = transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP(hf_cfg)
        arch = "GptOssForCausalLM"
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    d = hf_cfg.to_dict()
    cfg = ModelConfig(arch, 64, 32, 24, 1, 4, 2, 8, hf_config=d)
    return block.eval(), cfg


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_moe_op_matches_transformers_block(family):
    from opdisagg_rt.models.llama import WeightSource
    block, cfg = _block_and_config(family)
    weights = {f"model.layers.0.mlp.{k}": v.detach() for k, v in block.state_dict().items()}
    op = _moe_op(cfg, WeightSource(weights, torch.float32, family), 0, family)
    x = torch.randn(1, 29, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x)
    want = want[0] if isinstance(want, tuple) else want
    assert (op.moe(x[0]) - want[0]).abs().max() < 2e-5


# ---- attention sinks in the prefill path ------------------------------------------------------

@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cached", [0, 11])
def test_prefill_with_sinks_matches_reference(window, cached):
    g = torch.Generator().manual_seed(3)
    nh, kvh, d, bs, n = 4, 2, 16, 4, 9
    ctx = cached + n
    nblocks = -(-ctx // bs)
    k_cache, v_cache = torch.randn(nblocks + 2, bs, kvh, d, generator=g), torch.randn(nblocks + 2, bs, kvh, d, generator=g)
    table = torch.randperm(nblocks + 2, generator=g)[:nblocks]
    pos = torch.arange(cached, ctx)
    slots = table[pos // bs] * bs + pos % bs
    q = torch.randn(n, nh, d, generator=g)
    k, v = k_cache.view(-1, kvh, d)[slots], v_cache.view(-1, kvh, d)[slots]
    sinks = torch.randn(nh, generator=g)
    if window is not None:  # blocks wholly before the first query's window may be freed (unmapped)
        table[: max(0, cached - window + 1) // bs] = -1
    batch = StepBatch(["r"], torch.zeros(n, dtype=torch.long), pos, slots, torch.tensor([0, n]), torch.tensor([ctx]),
                      table[None], torch.tensor([n - 1]), 0, [n], [ctx], bs)
    for s in (sinks, None):
        got = paged_attention(q, k, v, k_cache, v_cache, batch, 0.25, window, s)
        want = torch.empty_like(q)
        C.paged_attention_ref(want, q, k_cache, v_cache, table[None], torch.tensor([0, n]), torch.tensor([ctx]), 0.25,
                              window or 0, s)
        assert (got - want).abs().max() < 1e-5
    assert (got - paged_attention(q, k, v, k_cache, v_cache, batch, 0.25, window, sinks)).abs().max() > 1e-3


# ---- families end to end ----------------------------------------------------------------------

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=4, num_hidden_layers=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8,
                                         head_dim=16, norm_topk_prob=True, num_hidden_layers=3,
                                         mlp_only_layers=[1])),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=48, num_local_experts=4, head_dim=16, sliding_window=8,
                                     num_hidden_layers=4)),
    # beyond the three families: Qwen2-MoE's q/k/v biases and sigmoid-gated shared expert
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                                         shared_expert_intermediate_size=40, num_hidden_layers=2)),
}


def _tokenizer(out: str) -> int:
    from tests.models.tiny_hf import plain_bpe_tokenizer
    return plain_bpe_tokenizer(out)


def make_checkpoint(root, family: str, init: float = 0.1) -> str:
    cls, extra = FAMILIES[family]
    out = root / family
    out.mkdir()
    vocab = _tokenizer(str(out))
    cfg = getattr(transformers, cls)(vocab_size=vocab, hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                                     num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
                                     bos_token_id=1, eos_token_id=2, initializer_range=init, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random sinks / norms that matter (the init leaves norms at 1)
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "q_norm.weight", "k_norm.weight")):
                p.copy_(torch.randn(p.shape) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("moe"), request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, hf


def _prompts(vocab: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine(path: str, **kw):
    from opdisagg_rt.engine import Engine
    # one thread: tiny GEMMs gain nothing from two, and OpenMP spin-waits on a busy machine
    return Engine(path, dtype="float32", kv_cache_memory=8 << 20, block_size=8, num_threads=1, **kw)


def _run_prefill(ops, ids: list[int], block_size: int = 8, dtype=torch.float32) -> torch.Tensor:
    from tests.models.tiny_hf import run_prefill
    return run_prefill(ops, ids, block_size, dtype)


def test_family_prefill_logits_match_transformers(family):
    from opdisagg_rt.models.loader import load_model
    from opdisagg_rt.models.registry import build_model_ops
    name, path, hf = family
    loaded = load_model(path)
    ops = build_model_ops(loaded, torch.float32, 512)
    kinds = {op.name.split(".")[-1] for op in ops}
    assert "moe" in kinds and "attn" in kinds
    if name == "qwen3_moe":  # mlp_only_layers=[1]: a dense MLP in layer 1
        assert [op.name for op in ops if op.name.startswith("layers.1.m")] == ["layers.1.mlp_norm", "layers.1.mlp"]
    if name == "gpt_oss":
        windows = [op.window for op in ops if isinstance(op, AttentionOp)]
        assert windows == [8, None, 8, None] and all(op.sinks is not None for op in ops if isinstance(op, AttentionOp))
    ids = _prompts(loaded.config.vocab_size, [45])[0]
    got = _run_prefill(ops, ids)
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    assert want.abs().max() > 1.0  # a visible scale
    assert (got - want).abs().max() < 2e-5, (got - want).abs().max()
    # bf16 (prepacked expert GEMMs, bf16 caches, sinks on bf16 SDPA): no further from float32
    # than transformers' own bf16 run (random q/k norms and sinks make bf16 noisy here)
    got16 = _run_prefill(build_model_ops(loaded, torch.bfloat16, 512), ids, dtype=torch.bfloat16)
    with torch.inference_mode():
        want16 = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    err, hf_err = float((got16 - want).abs().max()), float((want16 - want).abs().max())
    assert err <= 1.5 * hf_err + 0.02, (err, hf_err)


def _check_greedy(hf, prompts, outs, steps):
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == steps
        seq = prompt + out.token_ids
        with torch.inference_mode():
            logits = hf(torch.tensor([seq])).logits[0, len(prompt) - 1:-1]
        top2 = logits.topk(2, dim=-1)
        want = top2.indices[:, 0].tolist()
        assert out.token_ids == want
        margin = float((top2.values[:, 0] - top2.values[:, 1]).min())
        assert margin > MIN_MARGIN, f"near-tie along the trajectory ({margin:.2e}): pick another init scale"


def test_family_greedy_alone_batched_and_chunked(family):
    from opdisagg_rt.sampling import SamplingParams
    name, path, hf = family
    steps = 32
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=0)
    engine = _engine(path)
    prompts = _prompts(engine.model_config.vocab_size, [5, 19, 40])
    alone = [engine.generate([p], params, use_tqdm=False)[0] for p in prompts]
    _check_greedy(hf, prompts, alone, steps)
    batched = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    del engine
    # chunked prefill: chunks of 16 tokens (inside and across the gpt-oss window of 8)
    chunked_engine = _engine(path, max_num_batched_tokens=16, enable_prefix_caching=False)
    chunked = chunked_engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(chunked, alone):
        assert a.token_ids == b.token_ids
        lp_a = [lp[t] for lp, t in zip(a.logprobs, a.token_ids)]
        lp_b = [lp[t] for lp, t in zip(b.logprobs, b.token_ids)]
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) < 1e-4


def test_bench_runs_on_the_tiny_checkpoint(family):
    from tests.models.tiny_hf import check_bench_runs
    _, path, _ = family
    check_bench_runs(path)
