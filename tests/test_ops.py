"""The paged-KV copy ops of opdisagg_rt._C (CPU kernels) against their torch references."""

import pytest
import torch

from opdisagg_rt import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def make_caches(num_blocks, block_size, heads, dim, dtype):
    return rand(num_blocks, block_size, heads, dim, dtype=dtype), rand(num_blocks, block_size, heads, dim, dtype=dtype)


# ---- reshape_and_cache ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_blocks,block_size,heads,dim", [
    (1, 1, 1, 1, 1),
    (7, 5, 3, 3, 5),      # odd everything
    (37, 11, 4, 2, 24),
    (64, 16, 16, 4, 64),  # exactly fills 4 blocks' worth of slots and more
])
def test_reshape_and_cache_matches_ref(dtype, num_tokens, num_blocks, block_size, heads, dim):
    g = torch.Generator().manual_seed(num_tokens)
    key, value = rand(num_tokens, heads, dim, dtype=dtype), rand(num_tokens, heads, dim, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1  # padding tokens
    kc, vc = make_caches(num_blocks, block_size, heads, dim, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ops.reshape_and_cache(key, value, kc, vc, slots)
    ops.reshape_and_cache_ref(key, value, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_reshape_and_cache_block_boundaries_and_skip():
    block_size, heads, dim = 4, 2, 3
    kc, vc = torch.zeros(3, block_size, heads, dim), torch.zeros(3, block_size, heads, dim)
    # last slot of block 0, first of block 1, last of block 1, first of block 2, one skipped
    slots = torch.tensor([3, 4, 7, 8, -1])
    key = torch.arange(5 * heads * dim, dtype=torch.float32).view(5, heads, dim) + 1
    value = -key
    ops.reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kc[0, 3], key[0]) and torch.equal(kc[1, 0], key[1])
    assert torch.equal(kc[1, 3], key[2]) and torch.equal(vc[2, 0], value[3])
    written = torch.zeros(12, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert (kc.view(12, -1)[~written] == 0).all()  # the -1 token wrote nowhere


def test_reshape_and_cache_strided_key_value():
    # K and V as slices of a fused QKV projection: token stride > heads * head_dim.
    tokens, heads, dim, q_heads = 9, 2, 8, 4
    qkv = rand(tokens, (q_heads + 2 * heads) * dim)
    key = qkv[:, q_heads * dim:(q_heads + heads) * dim].view(tokens, heads, dim)
    value = qkv[:, (q_heads + heads) * dim:].view(tokens, heads, dim)
    assert not key.is_contiguous()
    kc, vc = make_caches(4, 4, heads, dim, torch.float32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    slots = torch.tensor([0, 5, 6, -1, 15, 1, 2, 3, 4])
    ops.reshape_and_cache(key, value, kc, vc, slots)
    ops.reshape_and_cache_ref(key, value, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    # head-strided (transposed from [heads, tokens, dim]) works too
    k2 = rand(heads, tokens, dim).transpose(0, 1)
    ops.reshape_and_cache(k2, k2, kc, vc, slots)
    ops.reshape_and_cache_ref(k2, k2, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_reshape_and_cache_empty():
    kc, vc = make_caches(2, 4, 2, 8, torch.bfloat16)
    before = kc.clone()
    e = torch.empty(0, 2, 8, dtype=torch.bfloat16)
    ops.reshape_and_cache(e, e, kc, vc, torch.empty(0, dtype=torch.long))
    assert torch.equal(kc, before)
    ops.reshape_and_cache(rand(2, 2, 8, dtype=torch.bfloat16), rand(2, 2, 8, dtype=torch.bfloat16),
                          kc, vc, torch.tensor([-1, -1]))  # all skipped
    assert torch.equal(kc, before)


def test_reshape_and_cache_parallel_large():
    # Enough work for at::parallel_for to split across threads.
    tokens, heads, dim = 2048, 4, 64
    key, value = rand(tokens, heads, dim), rand(tokens, heads, dim)
    kc, vc = make_caches(160, 16, heads, dim, torch.float32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    slots = torch.randperm(160 * 16)[:tokens]
    ops.reshape_and_cache(key, value, kc, vc, slots)
    ops.reshape_and_cache_ref(key, value, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("mutate,match", [
    (dict(key=rand(3, 2)), r"key must be \[num_tokens, kv_heads, head_dim\]"),
    (dict(value=rand(3, 2, 5)), "value must have the shape of key"),
    (dict(key_cache=rand(4, 2, 16)), r"key_cache must be \[num_blocks, block_size, kv_heads, head_dim\], got shape \[4, 2, 16\]"),
    (dict(key_cache=rand(4, 2, 2, 9), value_cache=rand(4, 2, 2, 9)), "does not match key"),
    (dict(value_cache=rand(4, 2, 3, 8)), "value_cache must have the shape of key_cache"),
    (dict(slot_mapping=torch.tensor([0, 1, 2], dtype=torch.int32)), "slot_mapping must be int64"),
    (dict(slot_mapping=torch.tensor([0, 1])), "slot_mapping has 2 entries but key has 3 tokens"),
    (dict(slot_mapping=torch.tensor([0, 8, 1])), r"slot_mapping\[1\] = 8 is out of range \[-1, 8\)"),
    (dict(slot_mapping=torch.tensor([0, -2, 1])), r"slot_mapping\[1\] = -2 is out of range"),
    (dict(key_cache=rand(4, 2, 2, 8, dtype=torch.float16)), "must share one dtype"),
    (dict(key_cache=rand(2, 4, 2, 8).transpose(0, 1)), "key_cache must be contiguous"),
])
def test_reshape_and_cache_errors(mutate, match):
    args = dict(key=rand(3, 2, 8), value=rand(3, 2, 8), key_cache=rand(4, 2, 2, 8),
                value_cache=rand(4, 2, 2, 8), slot_mapping=torch.tensor([0, 1, 2]))
    args.update(mutate)
    before = args["key_cache"].clone()
    with pytest.raises((RuntimeError, IndexError), match=match):
        ops.reshape_and_cache(**args)
    assert torch.equal(args["key_cache"], before)  # nothing written on error


# ---- copy_blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_matches_ref(dtype):
    layers = 3
    kcs = [rand(9, 5, 3, 7, dtype=dtype) for _ in range(layers)]
    vcs = [rand(9, 5, 3, 7, dtype=dtype) for _ in range(layers)]
    kcs[1] = rand(9, 3, 1, 2, dtype=dtype)  # layers may differ in shape (hybrid models)
    ref_k, ref_v = [c.clone() for c in kcs], [c.clone() for c in vcs]
    mapping = torch.tensor([[0, 8], [2, 3], [2, 4], [7, 1]])
    ops.copy_blocks(kcs, vcs, mapping)
    ops.copy_blocks_ref(ref_k, ref_v, mapping)
    assert all(torch.equal(a, b) for a, b in zip(kcs + vcs, ref_k + ref_v))
    assert torch.equal(kcs[0][8], kcs[0][0]) and torch.equal(vcs[2][4], vcs[2][2])


def test_copy_blocks_empty():
    kc, vc = rand(4, 2, 2, 3), rand(4, 2, 2, 3)
    before = kc.clone()
    ops.copy_blocks([kc], [vc], torch.empty(0, 2, dtype=torch.long))
    ops.copy_blocks([], [], torch.tensor([[0, 1]]))
    assert torch.equal(kc, before)


@pytest.mark.parametrize("args,match", [
    (lambda kc: ([kc], [], torch.tensor([[0, 1]])), "got 1 key_caches but 0 value_caches"),
    (lambda kc: ([kc], [kc.clone()], torch.tensor([0, 1])), r"block_mapping must be \[num_pairs, 2\]"),
    (lambda kc: ([kc], [kc.clone()], torch.tensor([[0, 1, 2]])), r"block_mapping must be \[num_pairs, 2\]"),
    (lambda kc: ([kc], [kc.clone()], torch.tensor([[0, 1.0]])), "block_mapping must be int64"),
    (lambda kc: ([kc], [kc.clone()], torch.tensor([[0, 1], [4, 2]])), r"block_mapping\[1, 0\] = 4 is out of range \[0, 4\)"),
    (lambda kc: ([kc], [kc.clone()[:, :1]], torch.tensor([[0, 1]])), r"value_caches\[0\] must be contiguous"),
])
def test_copy_blocks_errors(args, match):
    kc = rand(4, 2, 2, 3)
    with pytest.raises((RuntimeError, IndexError), match=match):
        ops.copy_blocks(*args(kc))


# ---- gather_blocks / scatter_blocks -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 3, 5, 9), (5, 16, 2, 64), (6, 11), (4,)])
def test_gather_scatter_match_ref(dtype, shape):
    cache = rand(*shape, dtype=dtype)
    ids = torch.tensor([4, 0, 3, 3])[: shape[0]] % shape[0]
    out = ops.gather_blocks(cache, ids)
    assert out.is_contiguous() and out.shape == (len(ids), *shape[1:])
    assert torch.equal(out, ops.gather_blocks_ref(cache, ids))

    uniq = torch.tensor([3, 0, 1])
    buf = rand(3, *shape[1:], dtype=dtype)
    got, ref = cache.clone(), cache.clone()
    ops.scatter_blocks(buf, got, uniq)
    ops.scatter_blocks_ref(buf, ref, uniq)
    assert torch.equal(got, ref)
    # round trip: scatter(gather(x)) into a fresh cache restores those blocks
    fresh = torch.zeros_like(cache)
    ops.scatter_blocks(ops.gather_blocks(cache, uniq), fresh, uniq)
    assert torch.equal(fresh[uniq], cache[uniq])


def test_scatter_noncontiguous_buffer():
    cache = rand(6, 4, 3)
    buf = rand(4, 3, 2).permute(2, 0, 1)  # [2, 4, 3], not contiguous
    ids = torch.tensor([5, 1])
    ref = cache.clone()
    ops.scatter_blocks(buf, cache, ids)
    ops.scatter_blocks_ref(buf, ref, ids)
    assert torch.equal(cache, ref)


def test_gather_scatter_empty():
    cache = rand(3, 4, 2, 8)
    none = torch.empty(0, dtype=torch.long)
    assert ops.gather_blocks(cache, none).shape == (0, 4, 2, 8)
    before = cache.clone()
    ops.scatter_blocks(torch.empty(0, 4, 2, 8), cache, none)
    assert torch.equal(cache, before)
    empty_cache = rand(0, 4, 2, 8)  # a cache with no blocks
    assert ops.gather_blocks(empty_cache, none).shape == (0, 4, 2, 8)


@pytest.mark.parametrize("call,match", [
    (lambda c: ops.gather_blocks(c, torch.tensor([0, 3])), r"block_ids\[1\] = 3 is out of range \[0, 3\)"),
    (lambda c: ops.gather_blocks(c, torch.tensor([-1])), r"block_ids\[0\] = -1 is out of range"),
    (lambda c: ops.gather_blocks(c, torch.tensor([[0]])), r"block_ids must be 1-D"),
    (lambda c: ops.gather_blocks(c, torch.tensor([0], dtype=torch.int32)), "block_ids must be int64"),
    (lambda c: ops.gather_blocks(torch.tensor(1.0), torch.tensor([0])), "0-d"),
    (lambda c: ops.gather_blocks(c.transpose(1, 2), torch.tensor([0])), "cache must be contiguous"),
    (lambda c: ops.scatter_blocks(rand(1, 4, 2, 8), c, torch.tensor([5])), r"block_ids\[0\] = 5 is out of range"),
    (lambda c: ops.scatter_blocks(rand(2, 4, 2, 8), c, torch.tensor([0])), r"buffer must be \[n, \*cache.shape\[1:\]\]"),
    (lambda c: ops.scatter_blocks(rand(1, 4, 2, 7), c, torch.tensor([0])), r"buffer must be .* got shape \[1, 4, 2, 7\]"),
    (lambda c: ops.scatter_blocks(rand(1, 4, 2, 8, dtype=torch.float16), c, torch.tensor([0])), "buffer dtype Half does not match cache dtype Float"),
    (lambda c: ops.scatter_blocks(rand(1, 4, 2, 8), c, torch.tensor([0], device="meta")), "block_ids is on meta but cache is on cpu"),
])
def test_gather_scatter_errors(call, match):
    with pytest.raises((RuntimeError, IndexError), match=match):
        call(rand(3, 4, 2, 8))


# ---- torch.library.opcheck: schema, fake/Meta kernels, autograd registration, AOT dispatch ----

def opcheck_cases():
    kc, vc = rand(5, 4, 2, 8), rand(5, 4, 2, 8)
    key, value = rand(6, 2, 8), rand(6, 2, 8)
    slots = torch.tensor([0, 3, 4, -1, 19, 7])
    yield "reshape_and_cache", (key, value, kc, vc, slots)
    yield "reshape_and_cache", (key.bfloat16(), value.bfloat16(), kc.bfloat16(), vc.bfloat16(), slots)
    yield "copy_blocks", ([rand(5, 4, 2, 8), rand(5, 3)], [rand(5, 4, 2, 8), rand(5, 3)],
                          torch.tensor([[0, 1], [2, 4]]))
    yield "gather_blocks", (rand(5, 4, 2, 8), torch.tensor([4, 0, 2]))
    yield "gather_blocks", (rand(5, 4, 2, 8, dtype=torch.float16), torch.tensor([1]))
    yield "scatter_blocks", (rand(3, 4, 2, 8), rand(5, 4, 2, 8), torch.tensor([4, 0, 2]))


@pytest.mark.parametrize("name,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.opdisagg, name).default, args)


def test_meta_shapes():
    cache = torch.empty(5, 4, 2, 8, device="meta", dtype=torch.bfloat16)
    out = torch.ops.opdisagg.gather_blocks(cache, torch.empty(3, dtype=torch.long, device="meta"))
    assert out.shape == (3, 4, 2, 8) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="block_mapping must be int64"):
        torch.ops.opdisagg.copy_blocks([cache], [cache], torch.empty(1, 2, device="meta"))
