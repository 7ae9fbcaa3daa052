import pytest

from opdisagg_rt.cache.block_pool import BlockPool
from opdisagg_rt.cache.kv_cache_manager import KVCacheManager
from opdisagg_rt.cache.prefix_hash import ROOT_HASH, hash_block, hash_prefix_blocks
from opdisagg_rt.sampling import SamplingParams
from opdisagg_rt.scheduler.request import Request


def test_hash_is_stable_and_chained():
    a = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert a == hash_block(ROOT_HASH, [1, 2, 3, 4])  # no per-process salt
    assert a.hex() == hash_block(ROOT_HASH, (1, 2, 3, 4)).hex()
    assert hash_block(a, [5, 6]) != hash_block(ROOT_HASH, [5, 6])  # depends on the parent
    assert hash_block(ROOT_HASH, [1, 2], b"model-a") != hash_block(ROOT_HASH, [1, 2], b"model-b")
    hs = hash_prefix_blocks(list(range(10)), 4)
    assert len(hs) == 2 and hs[1] == hash_block(hs[0], [4, 5, 6, 7])


def test_refcounts_and_free_queue():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1 and all(b.ref_cnt == 1 for b in blocks)
    with pytest.raises(RuntimeError, match="only 1 free"):
        pool.allocate(2)
    pool.touch([blocks[0]])
    pool.free([blocks[0]])
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([blocks[1]])


def test_cached_block_reused_until_evicted_lru():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha", (1, 2))
    pool.cache_block(b, b"hb", (3, 4))
    pool.free([b, a])  # tail first: b evicted before a
    assert pool.lookup(b"ha", (1, 2)) is a
    assert pool.lookup(b"ha", (9, 9)) is None  # token check: a colliding hash is a miss
    (c,) = pool.allocate(1)  # the uncached free block goes first
    assert c.block_id == 2 and pool.num_evictions == 0
    (d,) = pool.allocate(1)  # then the least recently freed cached one: b
    assert d is b and pool.lookup(b"hb", (3, 4)) is None and pool.num_evictions == 1
    pool.touch([a])  # a prefix hit revives a free cached block
    assert a.ref_cnt == 1 and pool.num_free_blocks == 0


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(temperature=0))


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    r1 = _req("a", list(range(10)))
    assert kv.allocate_slots(r1, 10)
    kv.cache_full_blocks(r1, 10)  # 2 full blocks cached
    r2 = _req("b", list(range(10)) + [99])
    hits, n = kv.get_computed_blocks(r2)
    assert n == 8 and [b.block_id for b in hits] == kv.block_table("a")[:2]
    assert kv.allocate_slots(r2, 3, hits)
    assert kv.block_table("b")[:2] == kv.block_table("a")[:2] and hits[0].ref_cnt == 2
    # An exact repeat of an 8-token prompt still computes its last token (for the logits).
    r3 = _req("c", list(range(8)))
    hits, n = kv.get_computed_blocks(r3)
    assert n == 4
    kv.free(r1)
    kv.free(r2)
    assert kv.pool.num_free_blocks == 16


def test_allocation_fails_cleanly_when_full():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r = _req("a", list(range(20)))
    assert not kv.allocate_slots(r, 13)
    assert kv.pool.num_free_blocks == 3 and kv.block_table("a") == []
    assert kv.allocate_slots(r, 12)
