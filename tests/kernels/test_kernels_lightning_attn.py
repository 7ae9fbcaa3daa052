"""Lightning attention (MiniMax): references anchored on transformers, kernels against them.

Tolerances: references vs transformers and chunked vs recurrent references atol = rtol = 1e-5
(float32); Triton kernels vs the recurrent reference atol = rtol = 1e-4 for float32 inputs
(sums over up to 21 tokens and a 12-dim state, in a different order) and 2e-2 for bfloat16
inputs (the reference sees the same bf16 inputs; the output is rounded to bf16).
"""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.kernels.lightning_attn import (chunk_lightning_attn,
                                                fused_recurrent_lightning_attn,
                                                naive_chunk_lightning_attn,
                                                naive_recurrent_lightning_attn)

H, K, V = 3, 12, 20
LENS = [1, 16, 0, 21]  # one token, exactly one chunk of 16, empty, a chunk and a partial one
SLOPE = torch.tensor([0.5, 0.0625, 0.004])  # fast, medium and slow decays
TOL32 = 1e-4


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())


def _inputs(total, dtype, heads=H, dk=K, dv=V):
    q = (torch.randn(total, heads, dk) * 0.5).to(dtype)
    k = (torch.randn(total, heads, dk) * 0.5).to(dtype)
    v = torch.randn(total, heads, dv).to(dtype)
    return q, k, v


def test_naive_chunk_equals_recurrent():
    cu = _cu(LENS)
    q, k, v = _inputs(int(cu[-1]), torch.float32)
    h0 = torch.randn(len(LENS), H, K, V)
    o_r, s_r = naive_recurrent_lightning_attn(q, k, v, SLOPE, 0.7, cu, h0, True)
    for chunk in (4, 16, 64):
        o_c, s_c = naive_chunk_lightning_attn(q, k, v, SLOPE, 0.7, cu, h0, True, chunk_size=chunk)
        torch.testing.assert_close(o_c, o_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_c, s_r, atol=1e-5, rtol=1e-5)


def test_naive_matches_transformers_minimax():
    """The references reproduce transformers' MiniMaxLightningAttention: its chunked prefill
    (block_size 16, a partial last block) and its recurrent decode from the cached state."""
    minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    from transformers import MiniMaxConfig

    heads, dim, hidden = 4, 8, 32
    config = MiniMaxConfig(hidden_size=hidden, num_attention_heads=heads, head_dim=dim,
                           num_key_value_heads=heads, num_hidden_layers=3, block_size=16,
                           intermediate_size=64, vocab_size=64, hidden_act="silu")
    layer = minimax.MiniMaxLightningAttention(config, layer_idx=1).float().eval()
    slope = layer.slope_rate.flatten()

    def run_ours(x, fn, state=None):
        b, t, _ = x.shape
        qkv = layer.act_fn(layer.qkv_proj(x)).reshape(b * t, heads, 3 * dim)
        q, k, v = qkv.split(dim, dim=-1)
        cu = torch.arange(b + 1) * t
        o, s = fn(q, k, v, slope, 1.0, cu, state, True)
        o = layer.norm(o.reshape(b, t, heads * dim))
        return layer.out_proj(torch.sigmoid(layer.output_gate(x)) * o), s

    x = torch.randn(2, 37, hidden)
    x2 = torch.randn(2, 3, hidden)
    with torch.no_grad():
        out_hf, state_hf = layer(x, None, None)
        cache = minimax.MiniMaxCache()
        cache.set_linear_cache(1, state_hf.clone())
        out2_hf, state2_hf = layer(x2, None, None, past_key_values=cache)
        for fn in (naive_chunk_lightning_attn, naive_recurrent_lightning_attn):
            out, state = run_ours(x, fn)
            torch.testing.assert_close(out, out_hf, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(state, state_hf, atol=1e-5, rtol=1e-5)
            out2, state2 = run_ours(x2, fn, state)
            torch.testing.assert_close(out2, out2_hf, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(state2, state2_hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_kernel_varlen(dtype, assert_close):
    cu = _cu(LENS)
    q, k, v = _inputs(int(cu[-1]), dtype)
    h0 = torch.randn(len(LENS), H, K, V)
    o, s = chunk_lightning_attn(q, k, v, SLOPE, 0.7, cu, h0, True, chunk_size=16, block_v=16)
    o_ref, s_ref = naive_recurrent_lightning_attn(q, k, v, SLOPE, 0.7, cu, h0, True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close(o, o_ref, dtype, fp32_tol=TOL32)
    assert_close(s, s_ref, torch.float32, fp32_tol=TOL32)  # the state is float32 in both
    torch.testing.assert_close(s[2], h0[2])  # empty sequence: the state passes through


def test_chunk_kernel_single_sequence_no_state(assert_close):
    q, k, v = _inputs(19, torch.float32)
    o, s = chunk_lightning_attn(q, k, v, SLOPE, chunk_size=16)
    o_ref, _ = naive_recurrent_lightning_attn(q, k, v, SLOPE)
    assert s is None
    assert_close(o, o_ref, torch.float32, fp32_tol=TOL32)


def test_chunked_prefill_split_equals_one_shot(assert_close):
    """Two prefill calls passing the state (split at 10, inside a chunk) equal one call."""
    q, k, v = _inputs(21, torch.float32)
    o_full, s_full = chunk_lightning_attn(q, k, v, SLOPE, output_final_state=True, chunk_size=16)
    o_a, s_a = chunk_lightning_attn(q[:10], k[:10], v[:10], SLOPE, output_final_state=True,
                                    chunk_size=16)
    o_b, s_b = chunk_lightning_attn(q[10:], k[10:], v[10:], SLOPE, initial_state=s_a,
                                    output_final_state=True, chunk_size=16)
    assert_close(torch.cat([o_a, o_b]), o_full, torch.float32, fp32_tol=TOL32)
    assert_close(s_b, s_full, torch.float32, fp32_tol=TOL32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_recurrent_decode_in_place(dtype, assert_close):
    n, pool = 4, 7
    q, k, v = _inputs(n, dtype)
    state = torch.randn(pool, H, K, V)
    indices = torch.tensor([5, -1, 0, 3])  # -1: a padding row
    before = state.clone()
    o = fused_recurrent_lightning_attn(q, k, v, SLOPE, state, 0.7, state_indices=indices,
                                       block_v=16)
    live = torch.tensor([0, 2, 3])
    o_ref, s_ref = naive_recurrent_lightning_attn(q[live], k[live], v[live], SLOPE, 0.7,
                                                  torch.arange(4), before[indices[live]], True)
    assert_close(o[live], o_ref, dtype, fp32_tol=TOL32)
    assert (o[1] == 0).all()
    assert_close(state[indices[live]], s_ref, torch.float32, fp32_tol=TOL32)
    untouched = torch.tensor([1, 2, 4, 6])
    assert torch.equal(state[untouched], before[untouched])


def test_fused_recurrent_varlen_and_prefill_then_decode(assert_close):
    """Multi-token sequences through the recurrent kernel, and decode continuing the state of
    a chunked prefill, both equal the recurrent reference over the whole sequences."""
    lens = [3, 0, 5]
    cu = _cu(lens)
    q, k, v = _inputs(int(cu[-1]) + 2, torch.float32)
    state = torch.zeros(3, H, K, V)
    o = fused_recurrent_lightning_attn(q[:8], k[:8], v[:8], SLOPE, state, cu_seqlens=cu)
    o_ref, s_ref = naive_recurrent_lightning_attn(q[:8], k[:8], v[:8], SLOPE, cu_seqlens=cu,
                                                  output_final_state=True)
    assert_close(o, o_ref, torch.float32, fp32_tol=TOL32)
    assert_close(state, s_ref, torch.float32, fp32_tol=TOL32)

    # prefill 8 tokens (chunked), then decode 2 more one by one
    _, s = chunk_lightning_attn(q[:8], k[:8], v[:8], SLOPE, output_final_state=True, chunk_size=16)
    outs = [fused_recurrent_lightning_attn(q[t:t + 1], k[t:t + 1], v[t:t + 1], SLOPE, s)
            for t in (8, 9)]
    o_all, s_all = naive_recurrent_lightning_attn(q, k, v, SLOPE, output_final_state=True)
    assert_close(torch.cat(outs), o_all[8:], torch.float32, fp32_tol=TOL32)
    assert_close(s, s_all, torch.float32, fp32_tol=TOL32)


def test_empty_inputs():
    q, k, v = _inputs(0, torch.float32)
    o, s = chunk_lightning_attn(q, k, v, SLOPE, cu_seqlens=torch.zeros(1, dtype=torch.int64),
                                output_final_state=True)
    assert o.shape == (0, H, V) and s.shape == (0, H, K, V)
    state = torch.zeros(2, H, K, V)
    assert fused_recurrent_lightning_attn(q, k, v, SLOPE, state).shape == (0, H, V)


def test_argument_errors():
    q, k, v = _inputs(4, torch.float32)
    state = torch.zeros(4, H, K, V)
    with pytest.raises(ValueError, match="slope must have shape"):
        chunk_lightning_attn(q, k, v, SLOPE[:2])
    with pytest.raises(ValueError, match="k must have shape"):
        chunk_lightning_attn(q, k[:, :, :5], v, SLOPE)
    with pytest.raises(ValueError, match="as many v heads"):
        chunk_lightning_attn(q, k, torch.randn(4, 6, V), SLOPE)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_lightning_attn(q, k, v, SLOPE, chunk_size=24)
    with pytest.raises(ValueError, match="cu_seqlens must lie"):
        chunk_lightning_attn(q, k, v, SLOPE, cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        chunk_lightning_attn(q, k, v, SLOPE, initial_state=torch.zeros(2, H, K, V))
    with pytest.raises(ValueError, match="state must have dtype"):
        fused_recurrent_lightning_attn(q, k, v, SLOPE, state.bfloat16())
    with pytest.raises(ValueError, match="repeats a slot"):
        fused_recurrent_lightning_attn(q, k, v, SLOPE, state,
                                       state_indices=torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="beyond the state pool"):
        fused_recurrent_lightning_attn(q, k, v, SLOPE, state,
                                       state_indices=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="state has 2 entries"):
        fused_recurrent_lightning_attn(q, k, v, SLOPE, state[:2])
