"""Qwen3-Next: the Gated DeltaNet core and op, the gated attention, and the family end to end on a
tiny random checkpoint saved by transformers, run by our Engine in float32.

References: the gated delta rule core against the kernels' naive token-by-token recurrence
(`kernels/gated_delta_rule/naive.py`); the GDN ops (in-proj, conv, gates, core, gated norm,
out-proj) against transformers' `Qwen3NextGatedDeltaNet` on the same weights; the model against
`Qwen3NextForCausalLM`.

Tolerances: core vs naive recurrence, float32 inputs 2e-5 abs on outputs (|o| up to ~0.5) and states;
bfloat16 inputs (the core computes in float32 from the bf16 values) 2e-5 abs as well, against
the reference run on the same bf16 values. GDN ops split into steps (1-token rows, chunk-crossing
prefills, several requests on different slots, conv state carried) vs transformers' whole-sequence
module: 1e-4 abs (float32; outputs up to ~7, and the per-head RMS norm of the core output
amplifies its float32 rounding where a head's output is small; measured ~6e-5). Prefill logits vs transformers: 1e-4 abs (logits up to ~3.3; measured
8e-6); in bf16, the distance to the float32 logits at most 1.5x transformers' bf16 distance + 0.02
(measured 1.31 vs transformers' 1.28: random norms make bf16 noisy here). Greedy tokens identical for 32 steps (transformers' top-1/top-2 margin >= 1e-3 along
every compared trajectory, checked; the init scale is raised to 0.1); chunked prefill and
preemption give the same tokens and chosen-token logprobs within 1e-4.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from opdisagg_rt.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

from opdisagg_rt.layers.attention import AttentionOp, OProjOp, QKVProjOp
from opdisagg_rt.layers.gated_deltanet import _prep_qk, chunk_sequence, gated_delta_rule
from opdisagg_rt.step_batch import StepBatch
from tests.conftest import _tiny_tokenizer

transformers = pytest.importorskip("transformers")

MIN_MARGIN = 1e-3
STEPS = 32


# ---- the gated delta rule core ------------------------------------------------------------------

def _core_inputs(lengths, hk, hv, dk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k = torch.randn(t, hk, dk, generator=g).to(dtype), torch.randn(t, hk, dk, generator=g).to(dtype)
    v = torch.randn(t, hv, dv, generator=g).to(dtype)
    gate = -torch.rand(t, hv, generator=g) * 0.5  # log decays: mild and strong
    gate[::7] -= 4.0
    beta = torch.rand(t, hv, generator=g)
    return q, k, v, gate, beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_core_matches_naive_recurrence(dtype):
    """Decode rows first (one token each), then prefills of odd lengths across the 64-token
    chunk edge, each request on its own slot with a non-zero starting state."""
    hk, hv, dk, dv = 2, 4, 16, 8
    lengths = [1, 1, 1, 63, 64, 65, 130, 5]
    slots = torch.tensor([5, 0, 3, 1, 7, 2, 6, 4])
    q, k, v, g, beta = _core_inputs(lengths, hk, hv, dk, dv, dtype)
    cu = torch.tensor([0] + lengths).cumsum(0)
    pool = torch.randn(8, hv, dk, dv, generator=torch.Generator().manual_seed(1)) * 0.3
    state = pool.clone()
    got = gated_delta_rule(q, k, v, g, beta, state, slots, cu, num_decodes=3)
    want, final = naive_recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, cu_seqlens=cu,
                                                   initial_state=pool[slots], output_final_state=True,
                                                   use_qk_l2norm=True)
    assert got.dtype == torch.float32 and want.abs().max() > 0.2
    assert (got - want).abs().max() < 2e-5
    assert (state[slots] - final).abs().max() < 2e-5
    # the chunk size does not change the result (a chunk of 16 cuts the 63/64/65 rows elsewhere)
    lo, hi = int(cu[6]), int(cu[7])
    qp, kp = _prep_qk(q[lo:hi], k[lo:hi], hv)
    o16, s16 = chunk_sequence(qp, kp, v[lo:hi], g[lo:hi], beta[lo:hi], pool[6], chunk=16)
    assert (o16 - want[lo:hi]).abs().max() < 2e-5 and (s16 - final[6]).abs().max() < 2e-5


def test_core_one_token_prefill_equals_decode():
    hk, hv, dk, dv = 1, 2, 8, 8
    q, k, v, g, beta = _core_inputs([1], hk, hv, dk, dv, torch.float32, seed=3)
    init = torch.randn(1, hv, dk, dv)
    s1, s2 = init.clone(), init.clone()
    a = gated_delta_rule(q, k, v, g, beta, s1, torch.tensor([0]), torch.tensor([0, 1]), num_decodes=1)
    b = gated_delta_rule(q, k, v, g, beta, s2, torch.tensor([0]), torch.tensor([0, 1]), num_decodes=0)
    assert (a - b).abs().max() < 1e-6 and (s1 - s2).abs().max() < 1e-6 and (s1 - init).abs().max() > 1e-3


# ---- the GDN ops against transformers' module ---------------------------------------------------

def _gdn_module_and_ops(dtype=torch.float32):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from opdisagg_rt.config import ModelConfig
    from opdisagg_rt.models.llama import WeightSource
    from opdisagg_rt.models.qwen3_next import _gdn_ops
    cfg = transformers.Qwen3NextConfig(hidden_size=32, num_hidden_layers=1, layer_types=["linear_attention"],
                                       linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8,
                                       linear_value_head_dim=4, linear_conv_kernel_dim=4)
    torch.manual_seed(0)
    mod = Qwen3NextGatedDeltaNet(cfg, 0).eval()
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name == "A_log":
                p.copy_(torch.empty(p.shape).uniform_(0.01, 4).log())
            elif name == "dt_bias":
                p.copy_(torch.randn(p.shape))
            elif name == "norm.weight":
                p.copy_(1 + 0.5 * torch.randn(p.shape))
            else:
                p.normal_(0, 0.3)
    weights = {f"model.layers.0.linear_attn.{k}": v.detach() for k, v in mod.state_dict().items()}
    mc = ModelConfig("Qwen3NextForCausalLM", 64, 32, 64, 1, 4, 2, 8, rms_norm_eps=cfg.rms_norm_eps, hf_config=cfg.to_dict())
    ops = _gdn_ops(mc, WeightSource(weights, dtype, "test"), 0, "test")
    attn = ops[1]
    spec = attn.state_spec()
    attn.bind_state(torch.zeros(4, *spec.conv_shape), torch.zeros(4, *spec.recurrent_shape))
    return mod, ops


def _step(ops, x: torch.Tensor, rows: list[tuple[int, int]], slots: list[int]) -> torch.Tensor:
    """One step over `rows` (per request: its slice of x), decodes first as the runner orders them."""
    pieces = [x[lo:hi] for lo, hi in rows]
    lens = [hi - lo for lo, hi in rows]
    cu = torch.tensor([0] + lens).cumsum(0)
    n = int(cu[-1])
    batch = StepBatch([str(s) for s in slots], torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                      torch.zeros(n, dtype=torch.long), cu, torch.tensor(lens), torch.zeros(len(rows), 1, dtype=torch.long),
                      torch.arange(n), sum(1 for m in lens if m == 1), lens, lens, 8,
                      state_indices=torch.tensor(slots))
    t = {"hidden": torch.cat(pieces), "residual": torch.zeros(n, x.shape[-1], dtype=x.dtype)}
    for op in ops:
        op.forward(t, batch)
    return t["residual"]


def test_gdn_ops_split_steps_match_transformers_module():
    mod, ops = _gdn_module_and_ops()
    g = torch.Generator().manual_seed(5)
    xa, xb, xc = (torch.randn(n, 32, generator=g) for n in (150, 40, 12))
    with torch.no_grad():
        want = [mod(x[None])[0] for x in (xa, xb, xc)]
    assert min(float(w.abs().max()) for w in want) > 0.1
    # three requests on slots 2, 0, 3; prompts cut at 1, 70 (inside the second 64-token chunk),
    # 30; single-token rows (decode form) mixed with prefills; C's conv state spans 1-token steps
    got = {"a": [], "b": [], "c": []}
    steps = [
        [("a", 0, 1), ("b", 0, 30), ("c", 0, 2)],
        [("a", 1, 70), ("b", 30, 40)],
        [("c", 2, 3), ("a", 70, 150)],
        [("c", 3, 4)],
        [("c", 4, 12)],
    ]
    xs, slot = {"a": xa, "b": xb, "c": xc}, {"a": 2, "b": 0, "c": 3}
    for step in steps:
        step = sorted(step, key=lambda r: r[2] - r[1] != 1)  # decodes first
        x = torch.cat([xs[r][lo:hi] for r, lo, hi in step])
        offs = torch.tensor([0] + [hi - lo for _, lo, hi in step]).cumsum(0).tolist()
        out = _step(ops, x, list(itertools.pairwise(offs)), [slot[r] for r, _, _ in step])
        for (r, _, _), lo, hi in zip(step, offs[:-1], offs[1:]):
            got[r].append(out[lo:hi])
    for r, w in zip("abc", want):
        err = (torch.cat(got[r]) - w).abs().max()
        assert err < 1e-4, (r, float(err))


# ---- gated attention --------------------------------------------------------------------------

def test_output_gate_is_optional_and_exact():
    g = torch.Generator().manual_seed(0)
    wq, wk, wv, wg, wo = (torch.randn(16, 8, generator=g) for _ in range(5))
    h = torch.randn(3, 8, generator=g)
    plain = QKVProjOp("l.qkv_proj", wq, wk, wv)
    gated = QKVProjOp("l.qkv_proj", wq, wk, wv, gate=wg)
    assert plain.writes == ("q", "k", "v") and gated.writes == ("q", "k", "v", "gate")
    t0, t1 = {"hidden": h}, {"hidden": h}
    plain.forward(t0, None)
    gated.forward(t1, None)
    assert "gate" not in t0 and torch.equal(t0["q"], t1["q"]) and torch.allclose(t1["gate"], h @ wg.T, atol=1e-5)
    o_plain, o_gated = OProjOp("l.o_proj", wo.T.contiguous()), OProjOp("l.o_proj", wo.T.contiguous(), gated=True)
    assert o_plain.reads == ("attn_out", "residual") and o_gated.reads == ("attn_out", "gate", "residual")
    a = torch.randn(3, 16, generator=g)
    r0 = {"attn_out": a, "residual": torch.zeros(3, 8)}
    r1 = dict(r0, gate=t1["gate"])
    o_plain.forward(r0, None)
    o_gated.forward(r1, None)
    assert torch.allclose(r0["residual"], a @ wo, atol=1e-5)
    assert torch.allclose(r1["residual"], (a * torch.sigmoid(t1["gate"])) @ wo, atol=1e-5)
    with pytest.raises(ValueError, match="3 biases for 4 projections"):
        QKVProjOp("l.qkv_proj", wq, wk, wv, (wq[0], wk[0], wv[0]), gate=wg)


# ---- the family end to end --------------------------------------------------------------------

def make_checkpoint(out, init: float = 0.1, layer_types=None, hf_layer_types=None, extra=None) -> str:
    """A tiny Qwen3-Next saved by transformers. `hf_layer_types` is what transformers builds
    (default: `layer_types`); config.json then gets `layer_types` (e.g. with sliding layers)."""
    import json
    layer_types = layer_types or ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    out.mkdir(parents=True, exist_ok=True)
    vocab = _tiny_tokenizer(str(out))
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40,
              mlp_only_layers=[2], max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, initializer_range=init, layer_types=hf_layer_types or layer_types)
    kw.update(extra or {})
    cfg = transformers.Qwen3NextConfig(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms, gates and decays that matter (the init leaves them trivial)
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight", "model.norm.weight")):
                p.copy_(torch.randn(p.shape) * 0.3)  # zero-centred: scale 1 + w
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + torch.randn(p.shape) * 0.3)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape))
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.01, 4).log())
    model.save_pretrained(str(out))
    if hf_layer_types is not None:
        path = out / "config.json"
        d = json.loads(path.read_text())
        d["layer_types"] = list(layer_types)
        path.write_text(json.dumps(d, indent=2))
    return str(out)


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("qwen3_next") / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _prompts(vocab: int, lengths=(5, 19, 70)) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine(path: str, **kw):
    from opdisagg_rt.engine import Engine
    args = {"dtype": "float32", "kv_cache_memory": 8 << 20, "block_size": 8, "num_threads": 1}
    return Engine(path, **(args | kw))


def _params():
    from opdisagg_rt.sampling import SamplingParams
    return SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)


def run_prefill(ops, ids: list[int], block_size: int = 8, dtype=torch.float32) -> torch.Tensor:
    from tests.models.tiny_hf import run_prefill as run
    return run(ops, ids, block_size, dtype)


def check_greedy(hf, prompts, outs, steps=STEPS):
    from tests.models.tiny_hf import check_greedy as check
    check(hf, prompts, outs, steps, MIN_MARGIN)


def same(a, b, tol: float = 1e-4):
    from tests.models.tiny_hf import same_outputs
    same_outputs(a, b, tol)


def test_prefill_logits_match_transformers(qwen3_next):
    from opdisagg_rt.models.loader import load_model
    from opdisagg_rt.models.registry import build_model_ops
    path, hf = qwen3_next
    loaded = load_model(path)
    ops = build_model_ops(loaded, torch.float32, 512)
    names = [op.name for op in ops]
    assert names[1:8] == ["layers.0.attn_norm", "layers.0.qkv_proj", "layers.0.attn", "layers.0.o_proj",
                          "layers.0.mlp_norm", "layers.0.moe", "layers.1.attn_norm"]
    assert "layers.2.mlp" in names and "layers.2.moe" not in names  # mlp_only_layers=[2]
    assert [type(op).__name__ for op in ops if op.name.endswith(".attn")] == ["GatedDeltaNetOp", "AttentionOp"] * 2
    assert all(op.rope.rotary_dim == 4 for op in ops if isinstance(op, AttentionOp))  # partial rotary 0.25 of 16
    ids = _prompts(loaded.config.vocab_size, [90])[0]
    got = run_prefill(ops, ids)
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    assert want.abs().max() > 1.0
    assert (got - want).abs().max() < 1e-4, float((got - want).abs().max())
    # bf16: no further from the float32 logits than transformers' own bf16 run
    got16 = run_prefill(build_model_ops(loaded, torch.bfloat16, 512), ids, dtype=torch.bfloat16)
    with torch.inference_mode():
        want16 = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    err, hf_err = float((got16 - want).abs().max()), float((want16 - want).abs().max())
    assert err <= 1.5 * hf_err + 0.02, (err, hf_err)


# preemption: 3 state slots and 14 KV blocks for the 5 + 7 + 13 blocks the prompts need;
# a slot: 2 GDN layers x (conv [2*2*16 + 4*8, 3] + recurrent [4, 16, 8]) float32
STATE_SLOT = 2 * ((2 * 2 * 16 + 4 * 8) * 3 + 4 * 16 * 8) * 4
KV_BLOCK = 2 * 2 * 8 * 2 * 16 * 4
SMALL = dict(kv_cache_memory=3 * STATE_SLOT + 14 * KV_BLOCK, max_num_seqs=3)


def test_greedy_alone_batched_chunked_and_preempted(qwen3_next, caplog):
    from tests.models.tiny_hf import check_state_model_engine
    path, hf = qwen3_next
    # 13-token chunks cut prompts (and the 64-token GDN chunks) anywhere
    check_state_model_engine(lambda **kw: _engine(path, **kw), hf, _prompts(hf.config.vocab_size), _params(),
                             caplog, chunk_tokens=13, small_kw=SMALL)


def test_bad_config_is_rejected(qwen3_next):
    from opdisagg_rt.models.loader import load_model
    from opdisagg_rt.models.qwen3_next import build_qwen3_next_ops
    loaded = load_model(qwen3_next[0])
    hf = loaded.config.hf_config
    loaded.config.hf_config = dict(hf, layer_types=["linear_attention", "mamba"] * 2)
    with pytest.raises(ValueError, match=r"layer_types\[1\]='mamba'"):
        build_qwen3_next_ops(loaded.config, loaded.weights, torch.float32, 64)
    loaded.config.hf_config = dict(hf, layer_types=["sliding_attention"] + hf["layer_types"][1:])
    with pytest.raises(ValueError, match="sliding_window"):
        build_qwen3_next_ops(loaded.config, loaded.weights, torch.float32, 64)
    loaded.config.hf_config = dict(hf, linear_num_value_heads=3)
    with pytest.raises(ValueError, match="linear_num_value_heads=3"):
        build_qwen3_next_ops(loaded.config, loaded.weights, torch.float32, 64)


def test_bench_runs_on_the_tiny_checkpoint(qwen3_next):
    from tests.models.tiny_hf import check_bench_runs
    path, _ = qwen3_next
    check_bench_runs(path)
