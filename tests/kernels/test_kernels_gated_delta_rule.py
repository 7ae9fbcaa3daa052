"""Gated delta rule (Qwen3-Next): references anchored on transformers, kernels against them.

Tolerances: references vs transformers' torch functions and chunked vs recurrent references
atol = rtol = 1e-5 (float32); Triton kernels vs the recurrent reference atol = rtol = 1e-4 for
float32 inputs and 2e-2 for bfloat16 inputs (same bf16 inputs in the reference, output rounded
to bf16); float32 states in every case.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from opdisagg_rt.kernels.gated_delta_rule import (chunk_gated_delta_rule,
                                                  fused_recurrent_gated_delta_rule,
                                                  naive_chunk_gated_delta_rule,
                                                  naive_recurrent_gated_delta_rule)

HK, HV, K, V = 2, 4, 12, 20  # grouped: each q/k head serves 2 value heads
LENS = [1, 16, 0, 21]  # one token, exactly one chunk of 16, empty, a chunk and a partial one
TOL32 = 1e-4


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())


def _inputs(total, dtype, l2norm=True):
    q = torch.randn(total, HK, K)
    k = torch.randn(total, HK, K)
    if not l2norm:  # keep ||k||^2 beta below 2 so the un-normalised recurrence stays stable
        q, k = q * 0.25, k * 0.25
    v = torch.randn(total, HV, V)
    g = -torch.rand(total, HV) * 0.7  # log decay <= 0
    beta = torch.rand(total, HV)
    return [x.to(dtype) for x in (q, k, v)] + [g, beta.to(dtype)]


@pytest.mark.parametrize("l2norm", [True, False])
def test_naive_chunk_equals_recurrent(l2norm):
    cu = _cu(LENS)
    q, k, v, g, beta = _inputs(int(cu[-1]), torch.float32, l2norm)
    h0 = torch.randn(len(LENS), HV, K, V)
    o_r, s_r = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, cu, h0, True, l2norm)
    for chunk in (4, 16):
        o_c, s_c = naive_chunk_gated_delta_rule(q, k, v, g, beta, None, cu, h0, True, l2norm,
                                                chunk_size=chunk)
        torch.testing.assert_close(o_c, o_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_c, s_r, atol=1e-5, rtol=1e-5)


def _hf(name):
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    return inspect.unwrap(getattr(mod, name))  # the torch implementation, not a hub kernel


@pytest.mark.parametrize("l2norm", [True, False])
def test_naive_matches_transformers_qwen3_next(l2norm):
    """The references equal transformers' torch_chunk_gated_delta_rule and
    torch_recurrent_gated_delta_rule (batch of 2 as two varlen sequences, grouped heads,
    initial state, a partial last chunk)."""
    hf_chunk = _hf("torch_chunk_gated_delta_rule")
    hf_rec = _hf("torch_recurrent_gated_delta_rule")
    b, t = 2, 19
    q, k, v, g, beta = _inputs(b * t, torch.float32, l2norm)
    h0 = torch.randn(b, HV, K, V) * 0.5
    batched = [x.reshape(b, t, *x.shape[1:]) for x in (q, k, v, g, beta)]
    cu = torch.arange(b + 1) * t
    o_c, s_c = naive_chunk_gated_delta_rule(q, k, v, g, beta, None, cu, h0, True, l2norm, 16)
    o_r, s_r = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, cu, h0, True, l2norm)
    ref_c, ref_cs = hf_chunk(*batched, chunk_size=16, initial_state=h0, output_final_state=True,
                             use_qk_l2norm_in_kernel=l2norm)
    ref_r, ref_rs = hf_rec(*batched, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=l2norm)
    for o, s in ((o_c, s_c), (o_r, s_r)):
        for ref, ref_s in ((ref_c, ref_cs), (ref_r, ref_rs)):
            torch.testing.assert_close(o, ref.reshape(b * t, HV, V), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,l2norm", [(torch.float32, True), (torch.float32, False),
                                          (torch.bfloat16, True)])
def test_chunk_kernel_varlen(dtype, l2norm, assert_close):
    cu = _cu(LENS)
    q, k, v, g, beta = _inputs(int(cu[-1]), dtype, l2norm)
    h0 = torch.randn(len(LENS), HV, K, V)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, None, cu, h0, True, l2norm, chunk_size=16,
                                  block_v=16)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, cu, h0, True, l2norm)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close(o, o_ref, dtype, fp32_tol=TOL32)
    assert_close(s, s_ref, torch.float32 if dtype == torch.float32 else dtype, fp32_tol=TOL32)
    torch.testing.assert_close(s[2], h0[2])  # empty sequence: the state passes through


def test_chunk_kernel_single_sequence_default_scale(assert_close):
    q, k, v, g, beta = _inputs(19, torch.float32)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, chunk_size=16)
    o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    assert s is None
    assert_close(o, o_ref, torch.float32, fp32_tol=TOL32)


def test_chunked_prefill_split_equals_one_shot(assert_close):
    """Two prefill calls passing the state (split at 10, inside a chunk) equal one call."""
    q, k, v, g, beta = _inputs(21, torch.float32)
    kw = dict(use_qk_l2norm_in_kernel=True, output_final_state=True, chunk_size=16)
    o_full, s_full = chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    o_a, s_a = chunk_gated_delta_rule(q[:10], k[:10], v[:10], g[:10], beta[:10], **kw)
    o_b, s_b = chunk_gated_delta_rule(q[10:], k[10:], v[10:], g[10:], beta[10:],
                                      initial_state=s_a, **kw)
    assert_close(torch.cat([o_a, o_b]), o_full, torch.float32, fp32_tol=TOL32)
    assert_close(s_b, s_full, torch.float32, fp32_tol=TOL32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_recurrent_decode_in_place(dtype, assert_close):
    n, pool = 4, 7
    q, k, v, g, beta = _inputs(n, dtype)
    state = torch.randn(pool, HV, K, V)
    indices = torch.tensor([5, -1, 0, 3], dtype=torch.int32)  # -1: a padding row
    before = state.clone()
    o = fused_recurrent_gated_delta_rule(q, k, v, g, beta, state, state_indices=indices,
                                         use_qk_l2norm_in_kernel=True, block_v=16)
    live = torch.tensor([0, 2, 3])
    o_ref, s_ref = naive_recurrent_gated_delta_rule(
        q[live], k[live], v[live], g[live], beta[live], None, torch.arange(4),
        before[indices[live].long()], True, True)
    assert_close(o[live], o_ref, dtype, fp32_tol=TOL32)
    assert (o[1] == 0).all()
    assert_close(state[indices[live].long()], s_ref, dtype, fp32_tol=TOL32)
    untouched = torch.tensor([1, 2, 4, 6])
    assert torch.equal(state[untouched], before[untouched])


def test_fused_recurrent_varlen_and_prefill_then_decode(assert_close):
    lens = [3, 0, 5]
    cu = _cu(lens)
    q, k, v, g, beta = _inputs(10, torch.float32)
    state = torch.zeros(3, HV, K, V)
    o = fused_recurrent_gated_delta_rule(q[:8], k[:8], v[:8], g[:8], beta[:8], state,
                                         cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q[:8], k[:8], v[:8], g[:8], beta[:8],
                                                    cu_seqlens=cu, output_final_state=True,
                                                    use_qk_l2norm=True)
    assert_close(o, o_ref, torch.float32, fp32_tol=TOL32)
    assert_close(state, s_ref, torch.float32, fp32_tol=TOL32)

    _, s = chunk_gated_delta_rule(q[:8], k[:8], v[:8], g[:8], beta[:8], output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, chunk_size=16)
    outs = [fused_recurrent_gated_delta_rule(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1],
                                             beta[t:t + 1], s, use_qk_l2norm_in_kernel=True)
            for t in (8, 9)]
    o_all, s_all = naive_recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                    use_qk_l2norm=True)
    assert_close(torch.cat(outs), o_all[8:], torch.float32, fp32_tol=TOL32)
    assert_close(s, s_all, torch.float32, fp32_tol=TOL32)


def test_empty_inputs():
    q, k, v, g, beta = _inputs(0, torch.float32)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.zeros(1, dtype=torch.int32),
                                  output_final_state=True)
    assert o.shape == (0, HV, V) and s.shape == (0, HV, K, V)
    state = torch.zeros(2, HV, K, V)
    assert fused_recurrent_gated_delta_rule(q, k, v, g, beta, state).shape == (0, HV, V)


def test_argument_errors():
    q, k, v, g, beta = _inputs(4, torch.float32)
    state = torch.zeros(4, HV, K, V)
    with pytest.raises(ValueError, match="multiple of q/k heads"):
        chunk_gated_delta_rule(q, k, torch.randn(4, 3, V), g, beta)
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_gated_delta_rule(q, k, v, g[:, :2], beta)
    with pytest.raises(ValueError, match="beta must have shape"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta[:3], state)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="state must be contiguous"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta,
                                         torch.zeros(4, HV, K, 2 * V)[..., :V])
    with pytest.raises(ValueError, match="state_indices must have shape"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta, state,
                                         state_indices=torch.tensor([0, 1]))
