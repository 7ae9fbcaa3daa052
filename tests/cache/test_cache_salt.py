"""Per-request tenant salt (vLLM's `cache_salt`) in the in-engine prefix cache: the first
block's hash commits to the salt, so different salts never share a block and equal ones do."""
from opdisagg_rt.cache.kv_cache_manager import KVCacheManager
from opdisagg_rt.cache.prefix_hash import ROOT_HASH, hash_block, root_hash
from opdisagg_rt.sampling import SamplingParams
from opdisagg_rt.scheduler.request import Request

TOKENS = list(range(10, 23))  # 3 full blocks of 4


def _req(rid, salt=None):
    return Request(rid, list(TOKENS), SamplingParams(max_tokens=4), cache_salt=salt)


def _computed(kv, req):
    hits, n = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, len(TOKENS) - n, hits)
    kv.cache_full_blocks(req, len(TOKENS))
    return n


def test_first_block_hash_commits_to_the_salt():
    assert root_hash(None) == ROOT_HASH and root_hash("a") != root_hash("b") != ROOT_HASH
    assert root_hash("a") == root_hash("a")  # stable: no per-process salt
    kv = KVCacheManager(16, 4)
    hashes = {}
    for salt in (None, "a", "b"):
        r = _req(f"r-{salt}", salt)
        kv._update_hashes(r, len(TOKENS))
        hashes[salt] = r.block_hashes
    assert hashes[None][0] == hash_block(ROOT_HASH, TOKENS[:4])  # unsalted: as before
    assert len({h[0] for h in hashes.values()}) == 3 and len({h[2] for h in hashes.values()}) == 3


def test_different_salts_never_share_blocks_same_salt_does():
    kv = KVCacheManager(32, 4)
    assert _computed(kv, _req("a1", "tenant-a")) == 0
    assert _computed(kv, _req("b1", "tenant-b")) == 0
    assert _computed(kv, _req("n1")) == 0
    assert _computed(kv, _req("a2", "tenant-a")) == 12
    assert _computed(kv, _req("b2", "tenant-b")) == 12
    assert _computed(kv, _req("n2")) == 12
