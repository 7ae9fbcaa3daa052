"""Engine <-> store: load stored prefix chunks into paged blocks on admission, store new full
chunks in the background.

Flow (the scheduler calls these; see its `kvstore hook` comments):
- `lookup(req, num_hit)` on admission, after the in-engine prefix-cache hit of `num_hit` tokens:
  how many more tokens the store can supply (whole blocks, at least one token left to compute).
- `load(req, block_table, num_hit, num_ext)` once the blocks are allocated: fetch, verify and
  `scatter_blocks` each chunk into its blocks; returns the tokens actually loaded (a chunk that
  turns out corrupt or vanished ends the load there: the rest is simply computed).
- `on_computed(req)` after each step: prompt chunks that became full are queued for storing.
- `on_finish(req)` before the request's blocks are freed: the generated part's full chunks too.

Storing never blocks the step: the main thread only takes an extra reference on the chunk's
blocks (so they cannot be reused under the worker's feet) and queues a job; a worker thread
`gather_blocks` them, encodes and writes to the tiers, and hands the blocks back; the engine
thread drops those references at its next call (the block pool is not thread-safe).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from opdisagg_rt import ops
from opdisagg_rt.kvstore.format import encode
from opdisagg_rt.kvstore.keys import KeySpace, key_name
from opdisagg_rt.kvstore.store import KVStore

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _ReqState:
    keys: list[bytes] = field(default_factory=list)
    stored: int = 0  # leading chunks already stored, queued, or known to be in the store
    plan: tuple[int, list[int]] = (0, [])  # (first chunk, tier of each chunk) from the last lookup
    store_tokens: int = -1  # tokens loaded from the store at first admission (-1: not yet)


@dataclass(slots=True)
class _StoreJob:
    names: list[str]
    keys: list[bytes]
    tokens: list[list[int]]
    block_ids: list[list[int]]
    pinned: list  # KVBlock references to drop when done


class KVConnector:
    def __init__(self, store: KVStore, keyspace: KeySpace, kv, attn_ops: list, block_size: int,
                 max_pending_chunks: int = 64):
        if keyspace.chunk_size % block_size:
            raise ValueError(f"kv_store_chunk_size={keyspace.chunk_size} must be a multiple of "
                             f"block_size={block_size}: loaded chunks must fill whole blocks")
        self.store, self.ks, self.kv, self.attn_ops = store, keyspace, kv, attn_ops
        self.block_size, self.chunk = block_size, keyspace.chunk_size
        self.fields = keyspace.fields
        self.max_pending_chunks = max_pending_chunks
        self._reqs: dict[str, _ReqState] = {}
        self._finished_metrics: dict[str, int] = {}
        self._q: queue.Queue[_StoreJob | None] = queue.Queue()
        self._done: queue.Queue[list] = queue.Queue()
        self._pending_chunks = 0
        self._worker = threading.Thread(target=self._run, name="kvstore-store", daemon=True)
        self._worker.start()

    # -- helpers ------------------------------------------------------------------------------

    def _state(self, req) -> _ReqState:
        st = self._reqs.get(req.request_id)
        if st is None:
            st = self._reqs[req.request_id] = _ReqState()
        return st

    def _keys(self, req, st: _ReqState, num_chunks: int) -> list[bytes]:
        if len(st.keys) < num_chunks:
            toks = req.all_token_ids[:num_chunks * self.chunk]
            st.keys += self.ks.chunk_keys(toks, len(st.keys), st.keys[-1] if st.keys else None)
        return st.keys

    def _release_done(self) -> None:
        """Drop the references the worker no longer needs (engine thread only)."""
        while True:
            try:
                blocks = self._done.get_nowait()
            except queue.Empty:
                return
            self._pending_chunks -= len(blocks) * self.block_size // self.chunk
            self.kv.pool.free(list(reversed(blocks)))

    # -- admission ----------------------------------------------------------------------------

    def lookup(self, req, num_hit: int) -> int:
        self._release_done()
        st = self._state(req)
        c, bs = self.chunk, self.block_size
        cap = (req.num_tokens - 1) // bs * bs  # the last prompt token always runs (its logits)
        first, last = num_hit // c, req.num_tokens // c
        if cap <= num_hit or first >= last:
            st.plan = (first, [])
            return 0
        keys = self._keys(req, st, last)
        tiers = self.store.lookup([key_name(k) for k in keys[first:last]])
        st.plan = (first, tiers)
        return max(0, min((first + len(tiers)) * c, cap) - num_hit)

    def load(self, req, block_table: list[int], num_hit: int, num_ext: int) -> int:
        """Fill blocks for tokens [num_hit, num_hit + num_ext); returns the tokens loaded."""
        st = self._state(req)
        first, tiers = st.plan
        c, bs = self.chunk, self.block_size
        start, end = num_hit, num_hit + num_ext
        tokens = req.all_token_ids
        done, nbytes, t0 = start, 0, time.perf_counter()
        for n, tier in enumerate(tiers):
            i = first + n
            c0, c1 = i * c, (i + 1) * c
            if c0 >= end:
                break
            got = self.store.get(key_name(st.keys[i]), st.keys[i], self.fields, tokens[c0:c1], tier)
            if got is None:
                break
            t = got[0]
            if t.dtype != self.attn_ops[0].k_cache.dtype or tuple(t.shape) != self._chunk_shape():
                logger.warning("kvstore: entry %s has shape %s %s, expected %s; recomputing",
                               key_name(st.keys[i]), tuple(t.shape), t.dtype, self._chunk_shape())
                break
            lo, hi = max(c0, start), min(c1, end)
            ids = torch.tensor(block_table[lo // bs:hi // bs], dtype=torch.long)
            nblk = len(ids)
            for layer, op in enumerate(self.attn_ops):
                kv_shape = (nblk, bs, *op.k_cache.shape[2:])
                ops.scatter_blocks(t[layer, 0, lo - c0:hi - c0].view(kv_shape), op.k_cache, ids)
                ops.scatter_blocks(t[layer, 1, lo - c0:hi - c0].view(kv_shape), op.v_cache, ids)
            nbytes += t[:, :, lo - c0:hi - c0].numel() * t.element_size()
            done = hi
            if hi == c1:
                st.stored = max(st.stored, i + 1)  # in the store already: never store it again
        loaded = done - start
        stats = self.store.stats
        stats.load_chunks += -(-loaded // c)
        stats.load_bytes += nbytes
        stats.load_seconds += time.perf_counter() - t0
        if st.store_tokens < 0:
            st.store_tokens = loaded
        return loaded

    def _chunk_shape(self) -> tuple[int, ...]:
        op = self.attn_ops[0]
        return (len(self.attn_ops), 2, self.chunk, *op.k_cache.shape[2:])

    # -- storing ------------------------------------------------------------------------------

    def on_computed(self, req) -> None:
        """After a step: queue the prompt's chunks that are now fully computed."""
        self._release_done()
        self._store_upto(req, min(req.num_computed_tokens, req.num_prompt_tokens))

    def on_finish(self, req, ok: bool) -> None:
        """Before the blocks are freed: queue every full chunk whose KV is written (prompt and
        generated), unless the request failed (its KV may be garbage)."""
        st = self._reqs.get(req.request_id)
        if st is None:
            return
        if ok:
            self._store_upto(req, req.num_computed_tokens)
        del self._reqs[req.request_id]
        self._finished_metrics[req.request_id] = max(st.store_tokens, 0)
        while len(self._finished_metrics) > 10000:  # aborted requests are never asked for
            self._finished_metrics.pop(next(iter(self._finished_metrics)))

    def _store_upto(self, req, num_tokens: int) -> None:
        st = self._state(req)
        n_full = num_tokens // self.chunk
        if n_full <= st.stored:
            return
        blocks = self.kv.req_blocks.get(req.request_id, [])
        per = self.chunk // self.block_size
        n_full = min(n_full, len(blocks) // per)
        lo, st.stored = st.stored, max(st.stored, n_full)
        if n_full <= lo:
            return
        if self._pending_chunks + n_full - lo > self.max_pending_chunks:
            # The tiers are slower than the engine: skip rather than pin ever more blocks.
            self.store.stats.store_skipped += n_full - lo
            return
        keys = self._keys(req, st, n_full)
        toks = req.all_token_ids
        pinned = blocks[lo * per:n_full * per]
        self.kv.pool.touch(pinned)
        self._pending_chunks += n_full - lo
        self._q.put(_StoreJob([key_name(k) for k in keys[lo:n_full]], keys[lo:n_full],
                              [toks[i * self.chunk:(i + 1) * self.chunk] for i in range(lo, n_full)],
                              [[b.block_id for b in blocks[i * per:(i + 1) * per]] for i in range(lo, n_full)],
                              pinned))

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                for name, key, toks, ids in zip(job.names, job.keys, job.tokens, job.block_ids):
                    self._store_chunk(name, key, toks, ids)
            except Exception:  # never let the worker die: a lost chunk is only a future miss
                logger.exception("kvstore: storing a chunk failed")
            finally:
                self._done.put(job.pinned)

    def _store_chunk(self, name: str, key: bytes, toks: list[int], ids: list[int]) -> None:
        missing = [i for i, t in enumerate(self.store.tiers)
                   if self.store.healthy(i) and not self.store._call(i, t.contains_many, [name], default=[True])[0]]
        if not missing:
            return
        t0 = time.perf_counter()
        idx = torch.tensor(ids, dtype=torch.long)
        parts = []
        for op in self.attn_ops:
            parts.append(ops.gather_blocks(op.k_cache, idx).flatten(0, 1))
            parts.append(ops.gather_blocks(op.v_cache, idx).flatten(0, 1))
        t = torch.stack(parts).unflatten(0, (len(self.attn_ops), 2))
        blob = encode(key, self.fields, toks, t)
        for i in missing:
            self.store._call(i, self.store.tiers[i].put, name, blob)
        s = self.store.stats
        s.store_chunks += 1
        s.store_bytes += t.numel() * t.element_size()
        s.store_seconds += time.perf_counter() - t0

    # -- lifecycle and metrics ----------------------------------------------------------------

    def request_store_tokens(self, request_id: str) -> int:
        """Prompt tokens loaded from the store for this request (at its first admission)."""
        st = self._reqs.get(request_id)
        if st is not None:
            return max(st.store_tokens, 0)
        return self._finished_metrics.pop(request_id, 0)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued chunk is stored (engine thread)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending_chunks > 0:
            try:
                blocks = self._done.get(timeout=0.05)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    return
                continue
            self._done.put(blocks)
            self._release_done()

    def stats(self) -> dict:
        return self.store.summary()

    def close(self) -> None:
        self.flush()
        self._q.put(None)
        self._worker.join(timeout=5)
        self.store.close()
