"""The CPU decode ops of the linear-attention layers (csrc/cpu/linear_attention.cpp) against
their torch references: `lightning_attention_decode`, `gated_delta_rule_decode` and
`causal_conv1d_update`, which update the state pool's rows in place.

References: ops.*_ref (gather, update as written, scatter, float32), and the layers' own torch
decode paths (`lightning_attention.recurrent_step`, `gated_deltanet.recurrent_step`, the
gather/cat conv), selected by patching `ops.linear_attention_decode_supported` to False.

Tolerances (float32 everywhere inside; bf16 inputs are exact in float32, so they do not widen
them): new states and float32 outputs within rtol 1e-5, atol 1e-5 (measured: <= 2e-6 abs on
states, <= 2e-5 abs on outputs of magnitude ~10 at d_k = 128, i.e. summation order only);
bf16 outputs within one bf16 rounding of the reference (rtol 8e-3, atol 1e-2); the conv update's
states are copies, so bit-identical; slots no row uses are bit-identical to before.
"""

import pytest
import torch

from opdisagg_rt import ops
from opdisagg_rt.layers import gated_deltanet as gd
from opdisagg_rt.layers import lightning_attention as la
from opdisagg_rt.step_batch import StepBatch

TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=8e-3, atol=1e-2)
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def strided_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a view with a row stride larger than a row (a slice of a fused projection)."""
    n = x.shape[0]
    wide = torch.zeros(n, 2 * x[0].numel() + 3, dtype=x.dtype)
    view = wide[:, 3:3 + x[0].numel()].view(n, *x.shape[1:])
    view.copy_(x)
    return view


# (num_slots, slots used, q/k heads, v heads, d_k, d_v): one sequence, scattered slots, head
# dims that are not multiples of 16 (scalar tails), 64 + 16 column tiles, GQA for GDN.
SHAPES = [
    (1, [0], 1, 1, 128, 128),
    (9, [7, 2, 5], 3, 3, 20, 37),
    (6, [4, 0], 2, 2, 16, 80),
    (4, [1], 2, 2, 5, 3),
]
GDN_SHAPES = SHAPES + [(8, [6, 1, 3], 1, 3, 24, 48), (5, [2, 4], 2, 4, 32, 19)]


# ---- lightning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots,used,h,_hv,dk,dv", SHAPES)
def test_lightning_decode_matches_ref(dtype, slots, used, h, _hv, dk, dv):
    g = torch.Generator().manual_seed(dk * 31 + dv)
    n, idx = len(used), torch.tensor(used)
    state = rand(slots, h, dk, dv, gen=g)
    decay = torch.exp(-torch.rand(h, generator=g))
    ref_state, before = state.clone(), state.clone()
    for step in range(3):  # consecutive decode steps accumulate in place
        q, k = rand(n, h, dk, dtype=dtype, gen=g), rand(n, h, dk, dtype=dtype, gen=g)
        v = rand(n, h, dv, dtype=dtype, gen=g)
        out32 = ops.lightning_attention_decode(strided_rows(q), k, strided_rows(v), state, idx, decay,
                                               out=torch.empty(n, h, dv))
        want = ops.lightning_attention_decode_ref(q, k, v, ref_state, idx, decay)
        torch.testing.assert_close(out32, want, **TOL)
        torch.testing.assert_close(state, ref_state, **TOL)
    out = ops.lightning_attention_decode(q, k, v, state.clone(), idx, decay)  # default out: v's dtype
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ops.lightning_attention_decode_ref(q, k, v, ref_state.clone(), idx, decay),
                               **(TOL if dtype == torch.float32 else BF16_TOL))
    untouched = [s for s in range(slots) if s not in used]
    assert torch.equal(state[untouched], before[untouched])


def test_lightning_decode_matches_layer_recurrent_step():
    g = torch.Generator().manual_seed(1)
    h, d, n = 4, 32, 3
    decay = la.DecayTables.build(la.minimax_slopes(h, 1, 4), 16)
    state = rand(5, h, d, d, gen=g)
    ref_state = state.clone()
    idx = torch.tensor([3, 0, 4])
    q, k, v = (torch.nn.functional.silu(rand(n, h, d, gen=g)).bfloat16() for _ in range(3))
    out = ops.lightning_attention_decode(q, k, v, state, idx, decay.step.view(-1), out=torch.empty(n, h, d))
    want = la.recurrent_step(q, k, v, decay, ref_state, idx)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(state, ref_state, **TOL)


# ---- gated delta rule --------------------------------------------------------------------------

@pytest.mark.parametrize("l2norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots,used,hk,hv,dk,dv", GDN_SHAPES)
def test_gated_delta_rule_decode_matches_ref(l2norm, dtype, slots, used, hk, hv, dk, dv):
    g = torch.Generator().manual_seed(dk * 17 + dv + hv)
    n, idx = len(used), torch.tensor(used)
    state = rand(slots, hv, dk, dv, scale=0.1, gen=g)
    ref_state, before = state.clone(), state.clone()
    qk_scale = 0.3 if l2norm else 0.05  # unnormalised keys: keep the delta rule stable
    for step in range(3):
        q = rand(n, hk, dk, dtype=dtype, gen=g, scale=qk_scale)
        k = rand(n, hk, dk, dtype=dtype, gen=g, scale=qk_scale)
        v = rand(n, hv, dv, dtype=dtype, gen=g)
        gate = -torch.rand(n, hv, generator=g) * 2
        beta = torch.rand(n, hv, generator=g)
        out = ops.gated_delta_rule_decode(strided_rows(q), strided_rows(k), v, gate, beta.t().contiguous().t(),
                                          state, idx, use_qk_l2norm=l2norm)
        want = ops.gated_delta_rule_decode_ref(q, k, v, gate, beta, ref_state, idx, use_qk_l2norm=l2norm)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, want, **TOL)
        torch.testing.assert_close(state, ref_state, **TOL)
    out16 = ops.gated_delta_rule_decode(q, k, v, gate, beta, state.clone(), idx, scale=0.5, use_qk_l2norm=l2norm,
                                        out=torch.empty(n, hv, dv, dtype=torch.bfloat16))
    want16 = ops.gated_delta_rule_decode_ref(q, k, v, gate, beta, ref_state.clone(), idx, scale=0.5,
                                             use_qk_l2norm=l2norm)
    torch.testing.assert_close(out16.float(), want16, **BF16_TOL)
    untouched = [s for s in range(slots) if s not in used]
    assert torch.equal(state[untouched], before[untouched])


def test_gated_delta_rule_decode_matches_layer_recurrent_step():
    g = torch.Generator().manual_seed(2)
    hk, hv, d, n = 2, 4, 32, 2
    state = rand(4, hv, d, d, scale=0.1, gen=g)
    ref_state = state.clone()
    idx = torch.tensor([2, 1])
    q, k, v = rand(n, hk, d, gen=g), rand(n, hk, d, gen=g), rand(n, hv, d, gen=g)
    gate, beta = -torch.rand(n, hv, generator=g), torch.rand(n, hv, generator=g)
    out = ops.gated_delta_rule_decode(q, k, v, gate, beta, state, idx)
    qp, kp = gd._prep_qk(q, k, hv)
    want, new = gd.recurrent_step(qp, kp, v, gate, beta, ref_state[idx])
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(state[idx], new, **TOL)


# ---- conv update -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("slots,used,channels", [(1, [0], 1), (7, [6, 1, 3], 37), (4, [2, 0], 64)])
def test_causal_conv1d_update_matches_ref(dtype, kernel, slots, used, channels):
    g = torch.Generator().manual_seed(kernel * 100 + channels)
    idx = torch.tensor(used)
    state = rand(slots, channels, kernel - 1, gen=g)
    weight = rand(channels, kernel, gen=g)
    ref_state, before = state.clone(), state.clone()
    for step in range(kernel + 1):  # past the window: the state fully turns over
        x = rand(len(used), channels, dtype=dtype, gen=g)
        out = ops.causal_conv1d_update(strided_rows(x), state, weight, idx)
        want = ops.causal_conv1d_update_ref(x, ref_state, weight, idx)
        torch.testing.assert_close(out, want, **TOL)
        assert torch.equal(state, ref_state)
    untouched = [s for s in range(slots) if s not in used]
    assert torch.equal(state[untouched], before[untouched])


# ---- the layers: CPU op path == torch path -----------------------------------------------------

def decode_batch(slots: list[int]) -> StepBatch:
    n = len(slots)
    rows = torch.arange(n)
    return StepBatch(request_ids=[f"r{i}" for i in range(n)], input_ids=torch.zeros(n, dtype=torch.long),
                     positions=rows, slot_mapping=torch.full((n,), -1), query_start_loc=torch.arange(n + 1),
                     seq_lens=torch.full((n,), 5), block_tables=torch.zeros(n, 1, dtype=torch.long),
                     logits_indices=rows, num_decodes=n, query_lens_list=[1] * n, seq_lens_list=[5] * n,
                     block_size=16, state_indices=torch.tensor(slots))


def run_layer_steps(op, make_inputs, slots, steps, monkeypatch, use_op: bool):
    if not use_op:
        monkeypatch.setattr(ops, "linear_attention_decode_supported", lambda q, state: False)
    outs = []
    for s in range(steps):
        t = make_inputs(s)
        op.forward(t, decode_batch(slots))
        outs.append(t["attn_out"])
    monkeypatch.undo()
    return outs


@pytest.mark.parametrize("dtype", DTYPES)
def test_gdn_layer_decode_op_path_matches_torch_path(dtype, monkeypatch):
    hk, hv, d, kernel, num_slots, slots = 2, 4, 24, 4, 5, [3, 0, 4]
    g = torch.Generator().manual_seed(5)
    conv_dim = 2 * hk * d + hv * d

    w, a_log = rand(conv_dim, kernel, gen=g, scale=0.5), torch.rand(hv, generator=g).log()
    a, b = (gd.GatedDeltaNetOp("layers.0.attn", hk, hv, d, d, conv_weight=w, A_log=a_log, dt_bias=torch.ones(hv),
                               norm_weight=torch.ones(d, dtype=dtype), eps=1e-6) for _ in range(2))
    conv, rec = rand(num_slots, conv_dim, kernel - 1, gen=g, scale=0.1), rand(num_slots, hv, d, d, gen=g, scale=0.01)
    a.bind_state(conv.clone(), rec.clone())
    b.bind_state(conv.clone(), rec.clone())
    inputs = [{"qkv": rand(3, conv_dim, dtype=dtype, gen=g), "z": rand(3, hv * d, dtype=dtype, gen=g),
               "ba": rand(3, 2 * hv, dtype=dtype, gen=g)} for _ in range(6)]
    got = run_layer_steps(a, lambda s: dict(inputs[s]), slots, 6, monkeypatch, use_op=True)
    want = run_layer_steps(b, lambda s: dict(inputs[s]), slots, 6, monkeypatch, use_op=False)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y.float(), **(TOL if dtype == torch.float32 else BF16_TOL))
    torch.testing.assert_close(a.recurrent_state, b.recurrent_state, **TOL)
    assert torch.equal(a.conv_state, b.conv_state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lightning_layer_decode_op_path_matches_torch_path(dtype, monkeypatch):
    h, d, num_slots, slots = 3, 40, 4, [2, 0]
    g = torch.Generator().manual_seed(6)
    ops_ = [la.LightningAttentionOp("layers.0.attn", h, d, la.minimax_slopes(h, 0, 3), chunk_size=8) for _ in range(2)]
    rec = rand(num_slots, h, d, d, gen=g, scale=0.01)
    for op in ops_:
        op.bind_state(torch.empty(num_slots, 0), rec.clone())
    inputs = [{x: torch.nn.functional.silu(rand(2, h * d, gen=g)).to(dtype) for x in ("q", "k", "v")} for _ in range(5)]
    got = run_layer_steps(ops_[0], lambda s: dict(inputs[s]), slots, 5, monkeypatch, use_op=True)
    want = run_layer_steps(ops_[1], lambda s: dict(inputs[s]), slots, 5, monkeypatch, use_op=False)
    for x, y in zip(got, want):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), y.float(), **(TOL if dtype == torch.float32 else BF16_TOL))
    torch.testing.assert_close(ops_[0].state, ops_[1].state, **TOL)


# ---- bad input: clear errors -------------------------------------------------------------------

def test_errors_name_the_argument():
    q, v = rand(2, 2, 8), rand(2, 2, 8)
    state, decay = torch.zeros(3, 2, 8, 8), torch.ones(2)
    with pytest.raises(RuntimeError, match=r"state_indices\[1\] = 0 repeats"):
        ops.lightning_attention_decode(q, q, v, state, torch.tensor([0, 0]), decay)
    with pytest.raises(IndexError, match=r"state_indices\[1\] = 3 is out of range"):
        ops.lightning_attention_decode(q, q, v, state, torch.tensor([0, 3]), decay)
    with pytest.raises(RuntimeError, match="state must be float32"):
        ops.lightning_attention_decode(q, q, v, state.double(), torch.tensor([0, 1]), decay)
    with pytest.raises(RuntimeError, match="decay has 3 entries for 2 heads"):
        ops.lightning_attention_decode(q, q, v, state, torch.tensor([0, 1]), torch.ones(3))
    with pytest.raises(RuntimeError, match="does not match q"):
        ops.lightning_attention_decode(q, q, rand(2, 2, 4), state, torch.tensor([0, 1]), decay)
    with pytest.raises(RuntimeError, match="unit stride on its last dimension"):
        ops.lightning_attention_decode(rand(2, 2, 16)[..., ::2], q, v, state, torch.tensor([0, 1]), decay)
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        ops.gated_delta_rule_decode(rand(2, 2, 8), rand(2, 2, 8), rand(2, 3, 8), torch.zeros(2, 3), torch.ones(2, 3),
                                    torch.zeros(3, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="beta must be float32"):
        ops.gated_delta_rule_decode(q, q, v, torch.zeros(2, 2), torch.ones(2, 2).bfloat16(), state,
                                    torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="conv_state .* does not match weight"):
        ops.causal_conv1d_update(rand(2, 5), torch.zeros(3, 5, 2), torch.ones(5, 4), torch.tensor([0, 1]))


# ---- torch.library.opcheck: schema, Meta kernels, AOT dispatch ---------------------------------

def opcheck_cases():
    idx = torch.tensor([2, 0])
    q, k, v = rand(2, 2, 8), rand(2, 2, 8), rand(2, 2, 12)
    yield "lightning_attention_decode", (torch.empty(2, 2, 12), q, k, v, rand(3, 2, 8, 12), idx, torch.rand(2))
    yield "lightning_attention_decode", (torch.empty(2, 2, 12, dtype=torch.bfloat16), q.bfloat16(), k.bfloat16(),
                                         v.bfloat16(), rand(3, 2, 8, 12), idx, torch.rand(2))
    yield "gated_delta_rule_decode", (torch.empty(2, 4, 12), rand(2, 2, 8), rand(2, 2, 8), rand(2, 4, 12),
                                      -torch.rand(2, 4), torch.rand(2, 4), rand(3, 4, 8, 12), idx, 0.35, True)
    yield "causal_conv1d_update", (torch.empty(2, 6), rand(2, 6), rand(3, 6, 3), rand(6, 4), idx)


@pytest.mark.parametrize("name,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.opdisagg, name).default, args)


def test_empty_batch_is_a_no_op():
    state, conv = rand(2, 2, 8, 8), rand(2, 6, 3)
    before, conv_before = state.clone(), conv.clone()
    none = torch.empty(0, dtype=torch.long)
    assert ops.lightning_attention_decode(rand(0, 2, 8), rand(0, 2, 8), rand(0, 2, 8), state, none,
                                          torch.ones(2)).shape == (0, 2, 8)
    assert ops.gated_delta_rule_decode(rand(0, 2, 8), rand(0, 2, 8), rand(0, 2, 8), torch.zeros(0, 2),
                                       torch.zeros(0, 2), state, none).shape == (0, 2, 8)
    assert ops.causal_conv1d_update(rand(0, 6), conv, rand(6, 4), none).shape == (0, 6)
    assert torch.equal(state, before) and torch.equal(conv, conv_before)


def test_parallel_split_matches_ref():
    # 4 rows x 4 heads of 128 x 128: more than one parallel task (8 heads each) when 2 threads run.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(9)
        n, h, d = 4, 4, 128
        idx = torch.tensor([5, 1, 4, 2])
        q, k, v = rand(n, h, d, gen=g, scale=0.2), rand(n, h, d, gen=g, scale=0.2), rand(n, h, d, gen=g)
        gate, beta = -torch.rand(n, h, generator=g), torch.rand(n, h, generator=g)
        state = rand(6, h, d, d, gen=g, scale=0.1)
        ref = state.clone()
        torch.testing.assert_close(ops.gated_delta_rule_decode(q, k, v, gate, beta, state, idx),
                                   ops.gated_delta_rule_decode_ref(q, k, v, gate, beta, ref, idx), **TOL)
        dec = torch.full((h,), 0.5)
        torch.testing.assert_close(ops.lightning_attention_decode(q, k, v, state, idx, dec, out=torch.empty(n, h, d)),
                                   ops.lightning_attention_decode_ref(q, k, v, ref, idx, dec), **TOL)
        torch.testing.assert_close(state, ref, **TOL)
    finally:
        torch.set_num_threads(threads)


ISA_SCRIPT = """
import torch
from opdisagg_rt import ops
g = torch.Generator().manual_seed(3)
for hk, hv, dk, dv in [(2, 2, 20, 37), (1, 2, 16, 80), (2, 2, 24, 147), (1, 1, 3, 2)]:
    n, idx = 2, torch.tensor([2, 0])
    q, k = torch.randn(n, hk, dk, generator=g), torch.randn(n, hk, dk, generator=g)
    v = torch.randn(n, hv, dv, generator=g)
    gate, beta = -torch.rand(n, hv, generator=g), torch.rand(n, hv, generator=g)
    state = torch.randn(3, hv, dk, dv, generator=g) * 0.1
    ref = state.clone()
    torch.testing.assert_close(ops.gated_delta_rule_decode(q, k, v, gate, beta, state, idx),
                               ops.gated_delta_rule_decode_ref(q, k, v, gate, beta, ref, idx), rtol=1e-5, atol=1e-5)
    if hk == hv:
        dec = torch.rand(hv, generator=g)
        torch.testing.assert_close(ops.lightning_attention_decode(q, k, v, state, idx, dec),
                                   ops.lightning_attention_decode_ref(q, k, v, ref, idx, dec), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("level", [0, 1])
def test_every_isa_variant_matches_ref(level):
    # The kernels are picked by CPUID at load; OPDISAGG_LINATTN_ISA caps the choice (0: baseline
    # SSE2 vectors, 1: AVX2) so the variants this machine would not pick are checked too.
    import os
    import subprocess
    import sys
    env = dict(os.environ, OPDISAGG_LINATTN_ISA=str(level), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
