"""Tiers and the tier stack, without a model: LRU budgets, atomic disk entries that outlive the
process, longest prefix across tiers with promotion, faults turned into misses with backoff."""
import logging
import os
import time

import pytest
import torch

from opdisagg_rt.kvstore.disk import DiskTier
from opdisagg_rt.kvstore.format import encode
from opdisagg_rt.kvstore.memory import MemoryTier
from opdisagg_rt.kvstore.store import KVStore, parse_tiers
from opdisagg_rt.kvstore.tier import Tier

FIELDS = "fp|float32|v1|g|c4"


def entry(i: int, n: int = 64):
    key = i.to_bytes(16, "little")
    t = torch.full((1, 2, 4, 1, n // 8), float(i))
    return f"opdkv-{key.hex()}", key, [i] * 4, t, encode(key, FIELDS, [i] * 4, t)


def test_memory_tier_lru_budget():
    blobs = [entry(i)[4] for i in range(4)]
    tier = MemoryTier(max_bytes=len(blobs[0]) * 3)
    for i, b in enumerate(blobs[:3]):
        tier.put(f"k{i}", b)
    tier.get("k0")  # k0 becomes most recently used: k1 is the LRU victim
    tier.put("k3", blobs[3])
    assert tier.contains_many(["k0", "k1", "k2", "k3"]) == [True, False, True, True]
    assert tier.evictions == 1 and tier.used <= tier.max_bytes


def test_disk_tier_atomic_and_survives_restart(tmp_path):
    name, key, toks, t, blob = entry(7)
    tier = DiskTier(str(tmp_path))
    tier.put(name, blob)
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if ".tmp." in f]
    again = DiskTier(str(tmp_path))  # a new process would see the same
    assert again.contains_many([name]) == [True] and again.get(name) == bytes(blob)
    assert again.used == len(blob)
    small = DiskTier(str(tmp_path), max_bytes=2 * len(blob))
    for i in range(8, 11):
        small.put(entry(i)[0], entry(i)[4])
    assert small.evictions == 2 and small.contains_many([name]) == [False]


def test_stack_longest_prefix_and_promotion(tmp_path):
    mem, disk = MemoryTier(1 << 20), DiskTier(str(tmp_path))
    store = KVStore([mem, disk])
    es = [entry(i) for i in range(4)]
    mem.put(es[1][0], es[1][4])  # chunk 1 only in memory, chunks 0 and 2 only on disk, 3 nowhere
    disk.put(es[0][0], es[0][4])
    disk.put(es[2][0], es[2][4])
    assert store.lookup([e[0] for e in es]) == [1, 0, 1]
    name, key, toks, t, _ = es[0]
    got, _ = store.get(name, key, FIELDS, toks, first_tier=1)
    assert torch.equal(got, t)
    assert mem.contains_many([name]) == [True]  # promoted
    assert store.stats.tier_hits == {"cpu": 0, disk.name: 1}


def test_corrupt_entry_is_dropped_and_next_tier_tried(tmp_path, caplog):
    mem, disk = MemoryTier(1 << 20), DiskTier(str(tmp_path))
    store = KVStore([mem, disk])
    name, key, toks, t, blob = entry(3)
    bad = bytearray(blob)
    bad[-5] ^= 1
    mem.verify = True  # pretend the memory copy came from outside, so it is checksummed
    mem.put(name, bad)
    disk.put(name, blob)
    with caplog.at_level(logging.WARNING):
        got, _ = store.get(name, key, FIELDS, toks)
    assert torch.equal(got, t) and store.stats.corrupt == 1 and "corrupt" in caplog.text
    with open(disk._file(name), "r+b") as f:  # now truncate the disk copy too
        f.truncate(len(blob) - 10)
    mem.delete(name)
    assert store.get(name, key, FIELDS, toks) is None
    assert store.stats.corrupt == 2 and not os.path.exists(disk._file(name))


class FlakyTier(Tier):
    def __init__(self):
        self.name, self.down, self.d = "flaky", True, {}

    def contains_many(self, names):
        if self.down:
            raise ConnectionError("connection refused")
        return [n in self.d for n in names]

    def get(self, name):
        if self.down:
            raise ConnectionError("connection refused")
        return self.d.get(name)

    def put(self, name, blob):
        if self.down:
            raise OSError(28, "No space left on device")
        self.d[name] = blob

    def delete(self, name):
        self.d.pop(name, None)


def test_faults_are_misses_with_one_warning_and_recovery(caplog):
    tier = FlakyTier()
    store = KVStore([tier], min_backoff_s=0.05)
    name, key, toks, t, blob = entry(1)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            assert store.lookup([name]) == []
            store.put(name, blob)
            assert store.get(name, key, FIELDS, toks) is None
    assert caplog.text.count("unavailable") == 1  # one clear warning per outage
    tier.down = False
    time.sleep(0.2)
    store.put(name, blob)
    assert store.lookup([name]) == [0] and store.get(name, key, FIELDS, toks) is not None
    assert "is back" in caplog.text


def test_parse_tiers(tmp_path):
    tiers = parse_tiers(f"cpu,disk:{tmp_path}", size=1 << 20)
    assert [type(t).__name__ for t in tiers] == ["MemoryTier", "DiskTier"] and tiers[0].max_bytes == 1 << 20
    with pytest.raises(ValueError, match="unknown kv_store tier"):
        parse_tiers("s3://bucket")
