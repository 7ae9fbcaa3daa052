"""The AMX bf16 projection kernel (decode rows) against float32 matmul, and its weight packing.

Tolerance: the kernel accumulates in float32 and rounds once to bf16, so each output is within
one bf16 rounding (half an ulp, plus float32 summation-order noise) of the float32 reference.
"""

import pytest
import torch

from opdisagg_rt import ops
from opdisagg_rt.layers.linear import Linear

needs_amx = pytest.mark.skipif(not ops.amx_available(), reason="CPU/OS without AMX-BF16")


def test_pack_layout_matches_the_documented_formula():
    n, k = 37, 70
    w = torch.arange(n * k, dtype=torch.float32).remainder(251).view(n, k).bfloat16()
    packed = ops.pack_weight_amx(w)
    assert packed.shape == (2, 3, 2, 16, 32)
    for nb, kb, t, i, j in [(0, 0, 0, 0, 0), (1, 2, 0, 2, 5), (0, 1, 1, 15, 31), (1, 0, 0, 7, 9), (0, 2, 1, 3, 7)]:
        row, inp = 32 * nb + 16 * t + i, 32 * kb + j
        expected = w[row, inp] if row < n and inp < k else 0
        assert packed[nb, kb, t, i, j] == expected


def reference(x, w, b):
    y = x.float() @ w.float().T
    return y + b.float() if b is not None else y


def assert_within_one_rounding(y, ref):
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp_min(1e-30)
    assert ((y.float() - ref).abs() <= 0.5 * ulp * 1.02 + 1e-5 * ref.abs().max()).all()


@needs_amx
@pytest.mark.parametrize("m", [1, 15, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("n,k", [(1, 576), (31, 32), (33, 70), (960, 576), (100, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_amx_matches_float32_matmul(m, n, k, with_bias):
    torch.manual_seed(m * 1000 + n + k)
    w = (torch.randn(n, k) * 0.1).bfloat16()
    x = torch.randn(m, k).bfloat16()
    b = torch.randn(n).bfloat16() if with_bias else None
    y = ops.linear_amx(x, ops.pack_weight_amx(w), n, b)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert_within_one_rounding(y, reference(x, w, b))


@needs_amx
@pytest.mark.parametrize("m", [5, 16, 32])  # 16 and 32 rows of K = 96: tile loads read x in place
def test_linear_amx_strided_rows_and_out(m):
    w = (torch.randn(64, 96) * 0.1).bfloat16()
    base = torch.randn(m, 200).bfloat16()
    x = base[:, 7:103]  # row stride 200
    out = torch.full((m, 80), 7.0).bfloat16()[:, :64]
    ops.linear_amx(x, ops.pack_weight_amx(w), 64, out=out)
    assert_within_one_rounding(out, reference(x, w, None))


@needs_amx
def test_linear_layer_uses_amx_for_few_rows_and_onednn_for_many():
    w = (torch.randn(300, 128) * 0.1).bfloat16()
    lin = Linear(w)
    assert lin.amx is not None
    for rows in (3, 64, 65, 300):
        x = torch.randn(rows, 128).bfloat16()
        assert_within_one_rounding(lin(x), reference(x, w, None))


@needs_amx
@pytest.mark.parametrize("m", [1, 17, 32, 64])
@pytest.mark.parametrize("kind", ["bf16", "q4_1", "q8_0"])
def test_residual_is_added_as_a_bf16_add_of_the_rounded_projection(m, kind):
    # out = bf16(residual + bf16(x @ W^T + b)): the two roundings of `residual + proj(x)` in
    # transformers' bf16 decoder layer, bit for bit, from strided residual rows.
    n, k = 70, 96
    x = torch.randn(m, k).bfloat16()
    b = torch.randn(n).bfloat16()
    residual = (torch.randn(m, n + 6) * 4).bfloat16()[:, 3:3 + n]  # rows with a stride
    if kind == "bf16":
        w = (torch.randn(n, k) * 0.1).bfloat16()
        run = lambda **kw: ops.linear_amx(x, ops.pack_weight_amx(w), n, b, **kw)
    elif kind == "q4_1":
        blocks = random_q4_1_blocks(n, k, seed=m)
        run = lambda **kw: ops.linear_amx_q4_1(x, ops.pack_weight_amx_q4_1(blocks), n, b, **kw)
    else:
        blocks = random_q8_0_blocks(n, k, seed=m)
        run = lambda **kw: ops.linear_amx_q8_0(x, ops.pack_weight_amx_q8_0(blocks), n, b, **kw)
    assert torch.equal(run(residual=residual), residual + run())


@needs_amx
@pytest.mark.parametrize("kind", ["bf16", "q4_1", "q8_0"])
def test_many_rows_on_two_threads(kind):
    # Past 64 rows the input's transpose is split over the threads, which must all write the
    # calling thread's buffer (a worker writing its own thread_local one crashed or left rows stale).
    n, k, m = 70, 96, 160
    x = torch.randn(m, k).bfloat16()
    if kind == "bf16":
        w = (torch.randn(n, k) * 0.1).bfloat16()
        run = lambda: ops.linear_amx(x, ops.pack_weight_amx(w), n)
    elif kind == "q4_1":
        blocks = random_q4_1_blocks(n, k, seed=7)
        w = ops.dequantize_q4_1(blocks).bfloat16()
        run = lambda: ops.linear_amx_q4_1(x, ops.pack_weight_amx_q4_1(blocks), n)
    else:
        blocks = random_q8_0_blocks(n, k, seed=7)
        w = ops.dequantize_q8_0(blocks).bfloat16()
        run = lambda: ops.linear_amx_q8_0(x, ops.pack_weight_amx_q8_0(blocks), n)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = run()
    finally:
        torch.set_num_threads(threads)
    assert_within_one_rounding(y, reference(x, w, None))


@needs_amx
def test_linear_layer_adds_the_residual_on_every_path():
    w = (torch.randn(64, 96) * 0.1).bfloat16()
    lin = Linear(w)
    for rows in (5, 200):  # AMX kernel, oneDNN
        x = torch.randn(rows, 96).bfloat16()
        residual = torch.randn(rows, 64).bfloat16()
        assert torch.equal(lin(x, residual=residual), residual + lin(x))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.linear_amx(torch.randn(2, 64).bfloat16(), torch.zeros(1, 2, 2, 16, 32).bfloat16(), 32,
                            residual=torch.zeros(2, 31).bfloat16()), "residual .* does not match out"),
    (lambda: ops.linear_amx(torch.randn(2, 64).bfloat16(), torch.zeros(1, 2, 2, 16, 32).bfloat16(), 32,
                            residual=torch.zeros(2, 32)), "residual must be bfloat16"),
    (lambda: ops.linear_amx(torch.randn(2, 64).bfloat16(), torch.zeros(1, 3, 2, 16, 32).bfloat16(), 32),
     "is not the packing of a"),
    (lambda: ops.linear_amx(torch.randn(2, 64), torch.zeros(1, 2, 2, 16, 32).bfloat16(), 32), "must be bfloat16"),
    (lambda: ops.linear_amx(torch.randn(2, 64).bfloat16(), torch.zeros(1, 2, 2, 16, 32).bfloat16(), 32,
                            bias=torch.zeros(31).bfloat16()), "bias has 31 entries"),
    (lambda: ops.pack_weight_amx(torch.randn(4, 4)), "must be a 2-D bfloat16"),
])
def test_errors_name_the_problem(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


@needs_amx
def test_opcheck():
    w = (torch.randn(40, 48) * 0.1).bfloat16()
    args = (torch.empty(3, 40).bfloat16(), torch.randn(3, 48).bfloat16(), ops.pack_weight_amx(w), None)
    torch.library.opcheck(torch.ops.opdisagg.linear_amx.default, args)
    torch.library.opcheck(torch.ops.opdisagg.linear_amx.default, args + (torch.randn(3, 40).bfloat16(),))


# ---- GGUF Q4_1 weights streamed 4-bit ----------------------------------------------------------

def random_q4_1_blocks(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    kb = k // 32
    d = (torch.rand(n, kb, generator=g) * 0.01 + 1e-4).half()
    m = (-torch.rand(n, kb, generator=g) * 0.05).half()
    qs = torch.randint(0, 256, (n, kb, 16), dtype=torch.uint8, generator=g)
    return torch.cat([d.view(torch.uint8).view(n, kb, 2), m.view(torch.uint8).view(n, kb, 2), qs], -1)


def test_pack_q4_1_layout_matches_the_documented_formula():
    n, k = 37, 64
    blocks = random_q4_1_blocks(n, k, seed=3)
    packed = ops.pack_weight_amx_q4_1(blocks)
    assert packed.shape == (2, 2, 640)
    qs = blocks[..., 4:].long()
    q = torch.cat([qs & 15, qs >> 4], -1)  # [n, kb, input]: GGUF holds input j low, j + 16 high
    for nb, kb, p, j in [(0, 0, 0, 0), (0, 1, 5, 17), (1, 0, 2, 31), (1, 1, 15, 9), (0, 0, 9, 16)]:
        first, second = 32 * nb + 2 * p, 32 * nb + 2 * p + 1
        lo = int(q[first, kb, j]) if first < n else 0
        hi = int(q[second, kb, j]) if second < n else 0
        assert int(packed[nb, kb, 32 * p + j]) == lo | hi << 4
    for nb, kb, c in [(0, 0, 0), (1, 1, 4), (0, 1, 31), (1, 0, 6)]:
        col = 32 * nb + c
        d, m = (blocks[col, kb, 0:2], blocks[col, kb, 2:4]) if col < n else (torch.zeros(2, dtype=torch.uint8),) * 2
        assert torch.equal(packed[nb, kb, 512 + 2 * c:514 + 2 * c], d)
        assert torch.equal(packed[nb, kb, 576 + 2 * c:578 + 2 * c], m)


def test_dequantize_q4_1_matches_the_gguf_loader():
    from opdisagg_rt.models.gguf_loader import _q4_1
    blocks = random_q4_1_blocks(7, 96)
    expected = torch.from_numpy(_q4_1(blocks.numpy().reshape(-1))).reshape(7, 96)
    assert torch.equal(ops.dequantize_q4_1(blocks), expected)


@needs_amx
@pytest.mark.parametrize("m", [1, 16, 32, 33, 64])
@pytest.mark.parametrize("n,k", [(960, 576), (33, 64), (576, 1536), (5, 32)])
def test_linear_amx_q4_1_is_bit_identical_to_the_bf16_weight(m, n, k):
    blocks = random_q4_1_blocks(n, k, seed=m + n)
    dense = ops.dequantize_q4_1(blocks).bfloat16()
    x = torch.randn(m, k).bfloat16()
    b = torch.randn(n).bfloat16()
    y4 = ops.linear_amx_q4_1(x, ops.pack_weight_amx_q4_1(blocks), n, b)
    assert torch.equal(y4, ops.linear_amx(x, ops.pack_weight_amx(dense), n, b))
    assert_within_one_rounding(y4, reference(x, dense, b))


@needs_amx
def test_linear_use_gguf_switches_decode_rows_only():
    blocks = random_q4_1_blocks(64, 96)
    dense = ops.dequantize_q4_1(blocks).bfloat16()
    lin = Linear(dense)
    lin.use_gguf(("q4_1", blocks))
    assert lin.amx_gguf is not None and lin.amx is None
    for rows in (1, 64, 200):
        x = torch.randn(rows, 96).bfloat16()
        assert_within_one_rounding(lin(x), reference(x, dense, None))
    with pytest.raises(ValueError, match="do not match the weight"):
        Linear(dense).use_gguf(("q4_1", blocks[:3]))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.pack_weight_amx_q4_1(torch.zeros(4, 2, 18, dtype=torch.uint8)), r"uint8 \[N, K/32, 20\]"),
    (lambda: ops.linear_amx_q4_1(torch.randn(2, 48).bfloat16(), torch.zeros(1, 1, 640, dtype=torch.uint8), 32),
     "K % 32 == 0"),
    (lambda: ops.linear_amx_q4_1(torch.randn(2, 64).bfloat16(), torch.zeros(1, 3, 640, dtype=torch.uint8), 32),
     "is not the packing of a"),
])
def test_q4_1_errors_name_the_problem(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


def random_q8_0_blocks(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    kb = k // 32
    d = (torch.rand(n, kb, generator=g) * 0.01 + 1e-4).half()
    qs = torch.randint(-128, 128, (n, kb, 32), dtype=torch.int8, generator=g)
    return torch.cat([d.view(torch.uint8).view(n, kb, 2), qs.view(torch.uint8)], -1)


def test_dequantize_q8_0_matches_the_gguf_loader():
    from opdisagg_rt.models.gguf_loader import _q8_0
    blocks = random_q8_0_blocks(5, 64)
    expected = torch.from_numpy(_q8_0(blocks.numpy().reshape(-1))).reshape(5, 64)
    assert torch.equal(ops.dequantize_q8_0(blocks), expected)


@needs_amx
@pytest.mark.parametrize("m", [1, 32, 33])
@pytest.mark.parametrize("n,k", [(1000, 576), (33, 64), (5, 32)])
def test_linear_amx_q8_0_is_bit_identical_to_the_bf16_weight(m, n, k):
    blocks = random_q8_0_blocks(n, k, seed=m + n)
    dense = ops.dequantize_q8_0(blocks).bfloat16()
    x = torch.randn(m, k).bfloat16()
    y8 = ops.linear_amx_q8_0(x, ops.pack_weight_amx_q8_0(blocks), n)
    assert torch.equal(y8, ops.linear_amx(x, ops.pack_weight_amx(dense), n))
