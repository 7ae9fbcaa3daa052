"""Chained, stable hashes of full token blocks (never Python's `hash`: it is salted per process)."""
from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes
ROOT_HASH: BlockHash = b"\x00" * 16


def root_hash(cache_salt: str | None = None) -> BlockHash:
    """Parent of a request's first block. A request's `cache_salt` (tenant salt) goes in here,
    so its first block's hash, and through the chain every later one, commits to the salt:
    requests with different salts never share a cached block."""
    if cache_salt is None:
        return ROOT_HASH
    salt = cache_salt.encode()
    h = hashlib.blake2b(b"opdisagg-cache-salt", digest_size=16)
    h.update(len(salt).to_bytes(4, "little") + salt)
    return h.digest()


def hash_block(parent: BlockHash, token_ids: list[int] | tuple[int, ...], extra: bytes = b"") -> BlockHash:
    """Hash of a block given its parent's hash: equal hashes mean equal whole prefixes."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(extra)
    return h.digest()


def hash_prefix_blocks(token_ids: list[int], block_size: int, extra: bytes = b"",
                       parent: BlockHash = ROOT_HASH, start_block: int = 0) -> list[BlockHash]:
    """Hashes of every full block of `token_ids` from `start_block` on, chained from `parent`."""
    hashes = []
    for start in range(start_block * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra)
        hashes.append(parent)
    return hashes
