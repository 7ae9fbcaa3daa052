"""rms_norm, silu_and_mul and rotary_embedding (CPU kernels of opdisagg_rt._C) against their
torch references in opdisagg_rt.ops.

Tolerances: float32 within 2e-6 relative (the kernels sum in a different order and use a
polynomial exp, relative error ~2e-7); bf16/fp16 results equal the reference's rounding except
for values whose float32 result sits on a rounding boundary (at most one ulp, rare; two for
rms_norm, whose normalized value is rounded before the weight multiplies it).
"""

import pytest
import torch
import torch.nn.functional as F

from opdisagg_rt import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close_ulp(actual, expected, dtype, ulps=1):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)
        return
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    diff = (actual.float() - expected.float()).abs()
    assert (diff <= ulps * ulp * expected.float().abs().clamp_min(1e-3) * 1.01).all(), diff.max()
    assert (actual != expected).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (37, 576), (5, 3, 100), (2048, 64), (3, 17)])
def test_rms_norm_matches_ref(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    assert_close_ulp(ops.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6), dtype, ulps=2)


def test_rms_norm_matches_transformers_module():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(96, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(96).bfloat16()
    x = torch.randn(13, 96).bfloat16()
    assert torch.equal(ops.rms_norm(x, norm.weight.data, 1e-5), norm(x))


def test_rms_norm_strided_rows_and_empty():
    base = torch.randn(9, 200)
    x = base[:, 10:74]  # row stride 200, unit stride inside the row
    w = torch.randn(64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5), rtol=2e-6, atol=2e-6)
    assert ops.rms_norm(torch.empty(0, 64), w, 1e-5).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (33, 2 * 40), (4, 3, 2 * 17), (300, 2 * 48)])
def test_silu_and_mul_matches_ref(dtype, shape):
    x = (torch.randn(shape) * 4).to(dtype)
    assert_close_ulp(ops.silu_and_mul(x), ops.silu_and_mul_ref(x), dtype)


def test_silu_and_mul_extremes():
    x = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("nan")] + [1.0] * 8])
    out = ops.silu_and_mul(x)
    ref = ops.silu_and_mul_ref(x)
    torch.testing.assert_close(out[:, :3], ref[:, :3], rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(out[:, 3:7], ref[:, 3:7], rtol=2e-6, atol=0)
    assert out[0, 7].isnan()


def rope_table(max_pos, rot, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, rot, 2).float() / rot)
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rot", [(9, 3, 64, 64), (4, 4, 128, 64), (3, 1, 20, 12), (2, 1, 96, 96)])
def test_rotary_embedding_matches_ref(dtype, is_neox, heads, kv_heads, head_dim, rot):
    T = 11
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim).to(dtype)  # q and k as strided views
    q = qkv[:, : heads * head_dim].view(T, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(T, kv_heads, head_dim)
    positions = torch.randint(0, 50, (T,))
    table = rope_table(50, rot)
    q_ref, k_ref = q.clone(), k.clone()
    ops.rotary_embedding(positions, q, k, table, is_neox)
    ops.rotary_embedding_ref(positions, q_ref, k_ref, table, is_neox)
    assert_close_ulp(q, q_ref, dtype)
    assert_close_ulp(k, k_ref, dtype)
    v = qkv[:, (heads + kv_heads) * head_dim:]
    assert torch.equal(v, qkv[:, (heads + kv_heads) * head_dim:])  # untouched neighbours


def test_rotary_embedding_matches_transformers_float32():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    T, H, D = 7, 4, 32
    q, k = torch.randn(T, H, D), torch.randn(T, 2, D)
    positions = torch.tensor([0, 1, 2, 10, 31, 5, 6])
    table = rope_table(32, D)
    cos, sin = table[positions].chunk(2, -1)
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    ops.rotary_embedding(positions, q, k, table, True)
    torch.testing.assert_close(q, q_hf[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, k_hf[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6), "weight has 7 entries"),
    (lambda: ops.rms_norm(torch.randn(3, 8), torch.randn(8).bfloat16(), 1e-6), "must have the dtype of input"),
    (lambda: ops.rms_norm(torch.randn(3, 8).int(), torch.randn(8).int(), 1e-6), "input must be float32"),
    (lambda: ops.silu_and_mul(torch.randn(3, 8), torch.empty(3, 5)), "twice out's"),
    (lambda: ops.rotary_embedding(torch.tensor([0, 99]), torch.randn(2, 2, 8), torch.randn(2, 1, 8),
                                  rope_table(10, 8)), r"positions.*99.*out of range|positions\[1\] = 99"),
    (lambda: ops.rotary_embedding(torch.tensor([0, 1]), torch.randn(2, 2, 8), torch.randn(2, 1, 8),
                                  rope_table(10, 10)), "must be even and at most head_dim"),
    (lambda: ops.rotary_embedding(torch.tensor([0, 1]), torch.randn(2, 2, 8), torch.randn(2, 1, 8),
                                  rope_table(10, 8).double()), "cos_sin_cache must be float32"),
])
def test_errors_name_the_problem(call, match):
    with pytest.raises((RuntimeError, IndexError), match=match):
        call()


def test_large_calls_split_over_threads_match_ref():
    torch.manual_seed(0)
    x = torch.randn(4096, 256).bfloat16()
    w = torch.randn(256).bfloat16()
    assert_close_ulp(ops.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6), torch.bfloat16, ulps=2)
    g = torch.randn(4096, 512).bfloat16()
    assert_close_ulp(ops.silu_and_mul(g), ops.silu_and_mul_ref(g), torch.bfloat16)


def opcheck_cases():
    yield "rms_norm", (torch.empty(5, 16), torch.randn(5, 16), torch.randn(16), 1e-6)
    yield "rms_norm", (torch.empty(5, 16).bfloat16(), torch.randn(5, 16).bfloat16(), torch.randn(16).bfloat16(), 1e-6)
    yield "silu_and_mul", (torch.empty(4, 8), torch.randn(4, 16))
    yield "rotary_embedding", (torch.tensor([0, 3, 1]), torch.randn(3, 4, 8), torch.randn(3, 2, 8), rope_table(5, 8), True)


@pytest.mark.parametrize("name,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.opdisagg, name).default, args)


def test_silu_reference_is_torch():
    x = torch.randn(3, 10)
    torch.testing.assert_close(ops.silu_and_mul_ref(x), F.silu(x[:, :5]) * x[:, 5:])
