"""Local-disk tier: one file per entry under a directory, written atomically (temp file in the
same directory, then os.replace), so a crash or a concurrent reader never sees half an entry
and another engine process sharing the directory sees every finished one. Survives restarts:
the index of sizes is rebuilt from the directory, oldest (by mtime) evicted first."""
from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict

from opdisagg_rt.kvstore.tier import Tier

SUFFIX = ".kv"


class DiskTier(Tier):
    def __init__(self, path: str, max_bytes: int | None = None):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.name = f"disk:{self.path}"
        self.max_bytes = max_bytes
        self.evictions = 0
        self._lock = threading.Lock()
        entries = []
        for root, _, files in os.walk(self.path):
            for f in files:
                p = os.path.join(root, f)
                if f.endswith(SUFFIX):
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    entries.append((st.st_mtime, f[:-len(SUFFIX)], st.st_size))
                elif ".tmp." in f:  # left by a crashed writer
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
        self._index: OrderedDict[str, int] = OrderedDict((n, s) for _, n, s in sorted(entries))
        self.used = sum(self._index.values())

    def _file(self, name: str) -> str:
        # Two-level fan-out keeps directories small with many entries.
        return os.path.join(self.path, name[-2:], name + SUFFIX)

    def contains_many(self, names: list[str]) -> list[bool]:
        # The file system, not the index: other processes write here too.
        return [os.path.exists(self._file(n)) for n in names]

    def get(self, name: str) -> bytes | None:
        try:
            with open(self._file(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, name: str, blob: bytes) -> None:
        path = self._file(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        with self._lock:
            self.used += len(blob) - self._index.pop(name, 0)
            self._index[name] = len(blob)
            victims = []
            while self.max_bytes is not None and self.used > self.max_bytes and len(self._index) > 1:
                n, s = self._index.popitem(last=False)
                self.used -= s
                self.evictions += 1
                victims.append(n)
        for n in victims:
            self._unlink(n)

    def delete(self, name: str) -> None:
        with self._lock:
            self.used -= self._index.pop(name, 0)
        self._unlink(name)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self._file(name))
        except FileNotFoundError:
            pass
