"""A stack of tiers (fastest first) behind one lookup/get/put, with fault isolation and metrics.

- Lookup finds the longest prefix of chunk keys present in *some* tier (chunk 3 may be in Redis
  and chunk 4 only in memory); get reads each chunk from the fastest tier holding it and promotes
  a lower-tier hit into the tiers above.
- A tier that raises (Redis down, disk full, timeout) is skipped for a backoff period (1 s,
  doubling to 30 s) with one warning per outage, then retried: the engine recomputes meanwhile.
- A corrupt entry is deleted from its tier and reported as a miss.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from opdisagg_rt.kvstore.disk import DiskTier
from opdisagg_rt.kvstore.format import CorruptEntry, decode
from opdisagg_rt.kvstore.memory import MemoryTier
from opdisagg_rt.kvstore.tier import Tier

logger = logging.getLogger(__name__)
_MISSING = object()


@dataclass(slots=True)
class _Health:
    down_until: float = 0.0
    backoff: float = 0.0
    failures: int = 0
    last_error: str = ""


@dataclass(slots=True)
class StoreStats:
    lookups: int = 0
    lookup_chunks: int = 0
    hit_chunks: int = 0
    load_chunks: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    store_chunks: int = 0
    store_bytes: int = 0
    store_seconds: float = 0.0
    store_skipped: int = 0  # chunks dropped instead of stored (slow tier, queue full)
    corrupt: int = 0
    errors: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)


def parse_tiers(spec, size: int | None = None) -> list[Tier]:
    """`spec`: "cpu", "disk:DIR", "redis://[:pw@]host:port/db", a comma-separated string of
    those (fastest first), Tier objects, or a list of any of them. `size` (bytes) caps the cpu
    tier (default 2 GiB) and the disk tier (default unbounded)."""
    if isinstance(spec, Tier):
        return [spec]
    if isinstance(spec, str):
        parts = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        parts = list(spec)
    tiers: list[Tier] = []
    for p in parts:
        if isinstance(p, Tier):
            tiers.append(p)
        elif p in ("cpu", "memory"):
            tiers.append(MemoryTier(size or 2 << 30))
        elif p.startswith("disk:"):
            tiers.append(DiskTier(p[5:], size))
        elif p.startswith(("redis://", "rediss://", "unix://")):
            from opdisagg_rt.kvstore.redis_tier import RedisTier
            tiers.append(RedisTier(p))
        else:
            raise ValueError(f"unknown kv_store tier {p!r}: use 'cpu', 'disk:DIR' or 'redis://host:port/db'")
    if not tiers:
        raise ValueError(f"kv_store={spec!r} names no tier")
    return tiers


class KVStore:
    def __init__(self, tiers: list[Tier], min_backoff_s: float = 1.0, max_backoff_s: float = 30.0):
        self.tiers = tiers
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.stats = StoreStats(tier_hits={t.name: 0 for t in tiers})
        self._health = [_Health() for _ in tiers]
        self._lock = threading.Lock()
        self._bg = ThreadPoolExecutor(1, thread_name_prefix="kvstore-promote")  # promotions into slow tiers

    # -- fault isolation ----------------------------------------------------------------------

    def _call(self, i: int, fn, *args, default=None):
        h, tier = self._health[i], self.tiers[i]
        if h.down_until and time.monotonic() < h.down_until:
            return default
        try:
            out = fn(*args)
        except Exception as e:  # any tier failure is a miss: recompute, never fail a request
            with self._lock:
                self.stats.errors += 1
                h.failures += 1
                first = h.backoff == 0.0
                h.backoff = min(self.max_backoff_s, max(self.min_backoff_s, 2 * h.backoff))
                h.down_until = time.monotonic() + h.backoff
                h.last_error = f"{type(e).__name__}: {e}"
            if first:
                logger.warning("kvstore tier %s unavailable (%s); serving by recomputing, retrying with "
                               "backoff", tier.name, h.last_error)
            return default
        if h.backoff:  # the engine, loader and store threads all call tiers: one of them reports
            with self._lock:
                failures, h.failures = h.failures, 0
                h.backoff, h.down_until = 0.0, 0.0
            if failures:
                logger.warning("kvstore tier %s is back after %d failed attempts", tier.name, failures)
        return out

    def healthy(self, i: int) -> bool:
        return not self._health[i].down_until or time.monotonic() >= self._health[i].down_until

    # -- operations ---------------------------------------------------------------------------

    def lookup(self, names: list[str]) -> list[int]:
        """Tier index holding each chunk of the longest stored prefix of `names`."""
        where: list[int | None] = [None] * len(names)
        n = len(names)
        for i, tier in enumerate(self.tiers):
            todo = [j for j in range(n) if where[j] is None]
            if not todo:
                break
            found = self._call(i, tier.contains_many, [names[j] for j in todo], default=None)
            for j, ok in zip(todo, found or ()):
                if ok:
                    where[j] = i
        prefix = []
        for w in where:
            if w is None:
                break
            prefix.append(w)
        with self._lock:
            self.stats.lookups += 1
            self.stats.lookup_chunks += len(names)
            self.stats.hit_chunks += len(prefix)
        return prefix

    def get(self, name: str, key: bytes, fields: str, token_ids: list[int], first_tier: int = 0
            ) -> tuple[torch.Tensor, int] | None:
        """(tensor, size in bytes) of a verified entry, trying tiers from `first_tier` down."""
        for i in range(first_tier, len(self.tiers)):
            tier = self.tiers[i]
            blob = self._call(i, tier.get, name, default=None)
            if blob is None:
                continue
            try:
                tensor = decode(blob, key, fields, token_ids, verify=tier.verify)
            except CorruptEntry as e:
                with self._lock:
                    self.stats.corrupt += 1
                logger.warning("kvstore: dropping corrupt entry %s in %s (%s); recomputing", name, tier.name, e)
                self._call(i, tier.delete, name)
                continue
            with self._lock:
                self.stats.tier_hits[tier.name] += 1
            for j in range(i):  # promote into the faster tiers
                self._promote(j, name, blob)
            return tensor, len(blob)
        return None

    def _promote(self, j: int, name: str, blob: bytes) -> None:
        if isinstance(self.tiers[j], MemoryTier):
            self._call(j, self.tiers[j].put, name, blob)
        else:
            self._bg.submit(self._call, j, self.tiers[j].put, name, blob)

    def contains(self, name: str) -> bool:
        return any(self._call(i, t.contains_many, [name], default=[False])[0] for i, t in enumerate(self.tiers))

    def put(self, name: str, blob: bytes) -> None:
        """Into every tier (each is independently useful: memory for this process, disk across
        restarts, Redis across processes)."""
        for i, tier in enumerate(self.tiers):
            self._call(i, tier.put, name, blob)

    def summary(self) -> dict:
        s = self.stats
        return {
            "tiers": [t.name for t in self.tiers],
            "lookups": s.lookups, "lookup_chunks": s.lookup_chunks, "hit_chunks": s.hit_chunks,
            "chunk_hit_rate": s.hit_chunks / s.lookup_chunks if s.lookup_chunks else 0.0,
            "load_chunks": s.load_chunks, "load_bytes": s.load_bytes,
            "load_gb_s": s.load_bytes / s.load_seconds / 1e9 if s.load_seconds else 0.0,
            "store_chunks": s.store_chunks, "store_bytes": s.store_bytes,
            "store_gb_s": s.store_bytes / s.store_seconds / 1e9 if s.store_seconds else 0.0,
            "store_skipped": s.store_skipped, "corrupt": s.corrupt, "errors": s.errors,
            "evictions": sum(t.evictions for t in self.tiers), "tier_hits": dict(s.tier_hits),
        }

    def close(self) -> None:
        self._bg.shutdown(wait=True)
        for t in self.tiers:
            try:
                t.close()
            except Exception:
                pass
