"""Store keys: chained stable hashes over fixed-size token chunks.

Key i commits to every token of chunks 0..i (chaining) and to everything that makes the KV bytes
meaningful: model fingerprint, dtype, KV layout version, layer group, chunk size and the optional
tenant salts (the engine-wide `salt` and the request's `cache_salt`). Equal keys therefore mean
interchangeable bytes; anything else can never collide into a hit. blake2b, never Python's `hash` (salted per process: two engines must agree).
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

LAYOUT_VERSION = 1  # bump when the chunk tensor layout ([layers, 2, tokens, heads, dim]) changes
KEY_BYTES = 16


@dataclass(slots=True, frozen=True)
class KeySpace:
    model_fingerprint: str
    dtype: str  # canonical torch dtype name, e.g. "bfloat16"
    layer_group: str  # e.g. "attn:0-29": a disaggregated stage stores only its own layers
    chunk_size: int = 256
    salt: str | None = None  # tenant salt: different salts never share an entry
    layout_version: int = LAYOUT_VERSION

    @property
    def fields(self) -> str:
        """Readable key fields, written in each entry's header and checked on load (the salt is
        left out of the header: only its hash, inside the root, is needed)."""
        return f"{self.model_fingerprint}|{self.dtype}|v{self.layout_version}|{self.layer_group}|c{self.chunk_size}"

    def root(self, cache_salt: str | None = None) -> bytes:
        """Parent of chunk 0: commits to the key fields, the engine-wide salt and the request's
        `cache_salt` (both must match to share)."""
        h = hashlib.blake2b(b"opdisagg-kvstore-root", digest_size=KEY_BYTES)
        h.update(self.fields.encode())
        # Salts are length-prefixed and flagged so that no (fields, salt, cache_salt) triple can
        # alias another; no request salt adds nothing, so unsalted keys stay as they were.
        h.update(_salt_bytes(self.salt))
        if cache_salt is not None:
            h.update(b"request-salt" + _salt_bytes(cache_salt))
        return h.digest()

    def chunk_keys(self, token_ids: list[int], start_chunk: int = 0, parent: bytes | None = None,
                   cache_salt: str | None = None) -> list[bytes]:
        """Keys of every full chunk of `token_ids` from `start_chunk` on (pass the key of chunk
        `start_chunk - 1` as `parent` to extend a chain without rehashing it; `cache_salt` is the
        request's tenant salt, used only when starting a chain)."""
        parent = self.root(cache_salt) if parent is None else parent
        c, keys = self.chunk_size, []
        for start in range(start_chunk * c, len(token_ids) - c + 1, c):
            h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
            h.update(array("q", token_ids[start:start + c]).tobytes())
            parent = h.digest()
            keys.append(parent)
        return keys


def _salt_bytes(salt: str | None) -> bytes:
    b = (salt or "").encode()
    return len(b).to_bytes(4, "little") + b + (b"\x01" if salt is not None else b"\x00")


def key_name(key: bytes) -> str:
    """The key as tiers spell it (file name, Redis key)."""
    return "opdkv-" + key.hex()
