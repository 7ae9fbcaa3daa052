"""KV caches decoupled from the engine: a tiered chunk store (CPU memory, local disk, Redis)
shared by engine processes, and the connector that loads and stores an engine's paged KV.

    Engine(model, kv_store="cpu")                          # or "disk:/var/kv", "redis://:pw@h:6379/0",
    Engine(model, kv_store=["cpu", "redis://127.0.0.1/0"])  # stacked, fastest first
"""
from __future__ import annotations

import hashlib

from opdisagg_rt.kvstore.connector import KVConnector
from opdisagg_rt.kvstore.format import CorruptEntry, decode, encode
from opdisagg_rt.kvstore.keys import KeySpace, key_name
from opdisagg_rt.kvstore.store import KVStore, parse_tiers

__all__ = ["KVConnector", "KVStore", "KeySpace", "CorruptEntry", "encode", "decode", "key_name",
           "parse_tiers", "make_connector", "layer_group"]


def layer_group(attn_ops: list) -> str:
    """Names the set of attention layers whose KV an engine (or a disaggregated stage) holds."""
    names = ",".join(op.name for op in attn_ops).encode()
    return f"attn{len(attn_ops)}-{hashlib.blake2b(names, digest_size=4).hexdigest()}"


def make_connector(engine, kv_store, size: int | None = None, chunk_size: int = 256,
                   salt: str | None = None) -> KVConnector:
    runner = engine.runner
    reason = engine.kv.hybrid_reason()
    if reason:  # the store keeps whole chunks of every layer's KV; these layers do not have them
        raise ValueError(f"kv_store is not supported for this model: it has {reason}; "
                         f"run it without kv_store")
    ks = KeySpace(engine.fingerprint, str(engine.dtype).removeprefix("torch."), layer_group(runner.attn_ops),
                  chunk_size, salt)
    store = kv_store if isinstance(kv_store, KVStore) else KVStore(parse_tiers(kv_store, size))
    return KVConnector(store, ks, engine.kv, runner.attn_ops, runner.block_size)
