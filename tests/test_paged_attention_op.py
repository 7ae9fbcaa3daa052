"""ops.paged_attention (CPU kernel of opdisagg_rt._C) against ops.paged_attention_ref.

Tolerances: float32 atol/rtol 1e-5; bfloat16/float16 atol 2e-2, rtol 2e-2 (the kernel and the
reference both accumulate in float32 and differ only in summation order and in the final
rounding of out to the half type, ~1 ulp = 8e-3 for bf16 at |x| ~ 1).
"""

import pytest
import torch

from opdisagg_rt import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_case(seq_lens, n_rows, heads, kv_heads, dim, block_size, dtype, seed=0, extra_blocks=3):
    """Random caches and a shuffled block table for requests with the given context lengths
    (including their new rows) and numbers of query rows."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(blocks_per_req + [1]) + 1
    num_blocks = sum(blocks_per_req) + extra_blocks
    kc = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.long)  # unused entries invalid
    used = 0
    for r, nb in enumerate(blocks_per_req):
        bt[r, :nb] = perm[used:used + nb]
        used += nb
    qsl = torch.tensor([0] + torch.tensor(n_rows, dtype=torch.long).cumsum(0).tolist())
    T = int(qsl[-1])
    q = torch.randn(T, heads, dim, generator=g).to(dtype)
    return q, kc, vc, bt, qsl, torch.tensor(seq_lens, dtype=torch.long)


def run_both(q, kc, vc, bt, qsl, sl, window=0, sinks=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.full_like(q, float("nan"))
    ref = torch.full_like(q, float("nan"))
    ops.paged_attention(out, q, kc, vc, bt, qsl, sl, scale, window, sinks)
    ops.paged_attention_ref(ref, q, kc, vc, bt, qsl, sl, scale, window, sinks)
    return out, ref


def assert_close(out, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, equal_nan=True)


# A mixed batch: decodes (one row each, contexts across block boundaries), a prefill with a
# cached prefix, a fresh prefill, a request with no rows this step, a single-token request.
MIXED = dict(seq_lens=[1, 17, 33, 80, 0, 41, 96], n_rows=[1, 1, 1, 23, 0, 41, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [
    (6, 2, 40, 16),   # GQA 3, head_dim not a multiple of 16
    (4, 4, 64, 5),    # MHA, odd block size
    (8, 1, 24, 16),   # MQA
    (9, 3, 64, 16),   # the benchmark model's shape
])
@pytest.mark.parametrize("window", [0, 7, 1000])
def test_mixed_batch_matches_ref(dtype, heads, kv_heads, dim, block_size, window):
    case = make_case(MIXED["seq_lens"], MIXED["n_rows"], heads, kv_heads, dim, block_size, dtype,
                     seed=heads * 100 + block_size)
    out, ref = run_both(*case, window=window)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 1, 5, 16, 200])
def test_sinks(dtype, window):
    case = make_case(MIXED["seq_lens"], MIXED["n_rows"], 6, 2, 40, 5, dtype, seed=7)
    sinks = torch.tensor([-3.0, 0.0, 1.5, 4.0, 30.0, -30.0])  # incl. a sink dominating the softmax
    out, ref = run_both(*case, window=window, sinks=sinks)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("seq_len", [1, 4, 5, 6, 15, 16, 17, 63, 64, 65, 129])
def test_block_and_tile_boundaries(seq_len):
    # contexts ending right before/at/after block (5) and kernel tile (64) boundaries
    for n in sorted({1, min(seq_len, 3), seq_len}):
        case = make_case([seq_len], [n], 4, 2, 16, 5, torch.float32, seed=seq_len * 10 + n)
        out, ref = run_both(*case)
        assert_close(out, ref, torch.float32)


def test_long_prefill_with_prefix_parallel():
    # 1 request x 200 rows over 700 keys: many work items over both threads.
    case = make_case([700], [200], 9, 3, 64, 16, torch.bfloat16, seed=3)
    out, ref = run_both(*case)
    assert_close(out, ref, torch.bfloat16)
    out, ref = run_both(*case, window=100)
    assert_close(out, ref, torch.bfloat16)


def test_strided_query_and_out_and_untouched_rows():
    _, kc, vc, bt, qsl, sl = make_case([9, 30], [2, 5], 6, 2, 40, 16, torch.float32, seed=5)
    # query as a slice of a fused QKV projection, with padding rows 0, 8, 9 outside the requests
    rows = int(qsl[-1]) + 3
    q = torch.randn(rows, 2 * 6 * 40)[:, : 6 * 40].view(rows, 6, 40)
    out_big = torch.zeros(rows, 6, 2 * 40)
    out = out_big[:, :, :40]
    assert not q.is_contiguous() and not out.is_contiguous()
    ref = torch.zeros(rows, 6, 40)
    ops.paged_attention(out, q, kc, vc, bt, qsl + 1, sl, 0.3)
    ops.paged_attention_ref(ref, q, kc, vc, bt, qsl + 1, sl, 0.3)
    assert_close(out, ref, torch.float32)
    assert (out[0] == 0).all() and (out[-2:] == 0).all()  # rows outside the requests untouched
    assert (out_big[:, :, 40:] == 0).all()


def test_extreme_scores_are_stable():
    q, kc, vc, bt, qsl, sl = make_case([50, 3], [50, 1], 4, 2, 32, 16, torch.float32, seed=11)
    for scale in (30.0, 1e-4):  # logits up to ~300: fp32 score rounding is amplified by exp
        out, ref = run_both(q, kc, vc, bt, qsl, sl, scale=scale)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_all_requests_empty():
    q, kc, vc, bt, qsl, sl = make_case([5, 7], [0, 0], 4, 2, 16, 16, torch.float32)
    out = torch.zeros(0, 4, 16)
    ops.paged_attention(out, q, kc, vc, bt, qsl, sl, 0.25)
    empty_bt = torch.zeros(0, 4, dtype=torch.long)
    ops.paged_attention(out, q, kc, vc, empty_bt, torch.zeros(1, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long), 0.25)


def test_single_token_equals_value_row():
    # one key: attention returns that key's value row whatever the scores
    q, kc, vc, bt, qsl, sl = make_case([1], [1], 4, 2, 16, 16, torch.float32)
    out = torch.empty_like(q)
    ops.paged_attention(out, q, kc, vc, bt, qsl, sl, 0.25)
    v = vc[bt[0, 0], 0]  # [KVH, D]
    torch.testing.assert_close(out[0], v.repeat_interleave(2, dim=0))


# ---- opcheck ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_opcheck(dtype, with_sinks):
    q, kc, vc, bt, qsl, sl = make_case([9, 20], [1, 6], 6, 2, 40, 5, dtype)
    out = torch.empty_like(q)
    sinks = torch.randn(6) if with_sinks else None
    torch.library.opcheck(torch.ops.opdisagg.paged_attention.default,
                          (out, q, kc, vc, bt, qsl, sl, 0.2, 4, sinks))


# ---- errors -----------------------------------------------------------------------------------

def _args():
    q, kc, vc, bt, qsl, sl = make_case([9, 20], [1, 6], 6, 2, 40, 5, torch.float32)
    return dict(out=torch.zeros_like(q), query=q, key_cache=kc, value_cache=vc, block_tables=bt,
                query_start_loc=qsl, seq_lens=sl, scale=0.2, window=0, sinks=None)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: dict(query=a["query"][0]), r"query must be \[num_tokens, heads, head_dim\]"),
    (lambda a: dict(out=a["out"][:, :4]), "out must have the shape of query"),
    (lambda a: dict(out=a["out"].double(), query=a["query"].double()),
     "query must be float32, bfloat16 or float16"),
    (lambda a: dict(out=a["out"].half()), "must share one dtype"),
    (lambda a: dict(key_cache=a["key_cache"][0]), r"key_cache must be \[num_blocks, block_size, kv_heads, head_dim\]"),
    (lambda a: dict(value_cache=a["value_cache"][:, :4]), "value_cache must have the shape of key_cache"),
    (lambda a: dict(key_cache=a["key_cache"][..., :32], value_cache=a["value_cache"][..., :32]),
     "key_cache head_dim 32 .* does not match query head_dim 40"),
    (lambda a: dict(query=a["query"][:, :5], out=a["out"][:, :5]),
     r"query heads \(5\) must be a multiple of key_cache kv_heads \(2\)"),
    (lambda a: dict(block_tables=a["block_tables"].int()), "block_tables must be int64"),
    (lambda a: dict(query_start_loc=a["query_start_loc"][:2]),
     "query_start_loc must have num_requests \\+ 1 = 3 entries"),
    (lambda a: dict(seq_lens=a["seq_lens"][:1]), "seq_lens must have num_requests = 2 entries"),
    (lambda a: dict(sinks=torch.zeros(6, dtype=torch.bfloat16)), "sinks must be float32"),
    (lambda a: dict(sinks=torch.zeros(5)), "sinks must have heads = 6 entries"),
    (lambda a: dict(query_start_loc=torch.tensor([0, 5, 3])),
     r"query_start_loc must be non-decreasing, got query_start_loc\[1\] = 5 > query_start_loc\[2\] = 3"),
    (lambda a: dict(query_start_loc=torch.tensor([0, 1, 9])),
     r"query_start_loc\[2\] = 9 exceeds the number of query rows 7"),
    (lambda a: dict(seq_lens=torch.tensor([9, 5])),
     r"seq_lens\[1\] = 5 is smaller than the 6 query rows of request 1"),
    (lambda a: dict(seq_lens=torch.tensor([9, 40])),
     r"request 1 \(seq_lens = 40\) needs block_tables\[1, 7\] but block_tables has only 5 columns"),
    (lambda a: dict(block_tables=a["block_tables"].index_fill(1, torch.tensor([2]), 99)),
     r"block_tables\[1, 2\] = 99 is out of range \[0, 9\)"),
    (lambda a: dict(key_cache=a["key_cache"].transpose(0, 1).contiguous().transpose(0, 1)),
     "key_cache must be contiguous"),
    (lambda a: dict(query=torch.randn(40, 6, 7).transpose(0, 2)),
     "query must have a unit stride on head_dim"),
])
def test_errors(mutate, match):
    args = _args()
    args.update(mutate(args))
    before = args["out"].clone()
    with pytest.raises((RuntimeError, IndexError), match=match):
        ops.paged_attention(**args)
    if args["out"].shape == before.shape:
        assert torch.equal(args["out"], before)  # nothing written on error


def test_unmapped_blocks_outside_window_are_not_read():
    # sliding-window layers free the blocks before the window: -1 there must be fine
    q, kc, vc, bt, qsl, sl = make_case([40], [1], 4, 2, 16, 5, torch.float32)
    bt[0, :5] = -1  # keys 0..24 unmapped; window 12 reads keys 28..39 only
    out, ref = run_both(q, kc, vc, bt, qsl, sl, window=12)
    assert_close(out, ref, torch.float32)
    with pytest.raises(IndexError, match=r"block_tables\[0, 0\] = -1 is out of range"):
        run_both(q, kc, vc, bt, qsl, sl, window=0)


# Decode-only batches (one row per request): in bfloat16 with head_dim 64 or 128 on a CPU with
# AVX512-BF16 these take the per-request decode fast path; other shapes/dtypes (head_dim 40,
# fp32/fp16) and CPUs without AVX512-BF16 take the generic path. Contexts cover partial, exact
# and multiple blocks, more than one 16-key chunk and a context longer than the 64-key tile.
DECODE_SEQ_LENS = [1, 2, 15, 16, 17, 31, 33, 64, 65, 100, 191, 256, 300]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [
    (9, 3, 64, 16),   # the benchmark model's shape
    (8, 8, 64, 16),   # MHA
    (16, 2, 64, 5),   # GQA 8 (head tiles of the P.V step), odd block size
    (4, 1, 128, 16),  # head_dim 128
    (6, 2, 40, 16),   # head_dim 40: generic path in every dtype
    (3, 3, 96, 8),    # head_dim 96: generic path
])
@pytest.mark.parametrize("window", [0, 1, 20, 1000])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_decode_batch_matches_ref(dtype, heads, kv_heads, dim, block_size, window, with_sinks):
    n = len(DECODE_SEQ_LENS)
    case = make_case(DECODE_SEQ_LENS, [1] * n, heads, kv_heads, dim, block_size, dtype,
                     seed=heads * 7 + dim + block_size)
    sinks = torch.linspace(-4.0, 6.0, heads) if with_sinks else None
    out, ref = run_both(*case, window=window, sinks=sinks)
    assert_close(out, ref, dtype)


def test_decode_rows_in_mixed_batch_parallel():
    # decodes (fast path in bf16) next to prefill chunks (generic path), split over threads
    seq_lens = [200, 17, 150, 1, 90, 33]
    n_rows = [1, 17, 1, 1, 40, 1]
    case = make_case(seq_lens, n_rows, 9, 3, 64, 16, torch.bfloat16, seed=21)
    for window in (0, 50):
        out, ref = run_both(*case, window=window, sinks=torch.linspace(-1.0, 2.0, 9))
        assert_close(out, ref, torch.bfloat16)
