"""CPU-memory tier: a byte budget with LRU eviction. Holds the encoded entries as they are, so a
hit here costs no copy and (the bytes never left this process) no checksum."""
from __future__ import annotations

import threading
from collections import OrderedDict

from opdisagg_rt.kvstore.tier import Tier


class MemoryTier(Tier):
    verify = False

    def __init__(self, max_bytes: int = 2 << 30):
        if max_bytes <= 0:
            raise ValueError(f"memory tier size must be > 0 bytes, got {max_bytes}")
        self.name = "cpu"
        self.max_bytes = max_bytes
        self.used = 0
        self.evictions = 0
        self._d: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()  # the connector's worker puts while the engine thread gets

    def contains_many(self, names: list[str]) -> list[bool]:
        with self._lock:
            return [n in self._d for n in names]

    def get(self, name: str) -> bytes | None:
        with self._lock:
            blob = self._d.get(name)
            if blob is not None:
                self._d.move_to_end(name)
            return blob

    def put(self, name: str, blob: bytes) -> None:
        if len(blob) > self.max_bytes:
            return  # larger than the whole budget: not worth evicting everything for
        with self._lock:
            old = self._d.pop(name, None)
            if old is not None:
                self.used -= len(old)
            while self._d and self.used + len(blob) > self.max_bytes:
                _, ev = self._d.popitem(last=False)
                self.used -= len(ev)
                self.evictions += 1
            self._d[name] = blob
            self.used += len(blob)

    def delete(self, name: str) -> None:
        with self._lock:
            old = self._d.pop(name, None)
            if old is not None:
                self.used -= len(old)
