"""Engine <-> store: load stored prefix chunks into paged blocks on admission, store new full
chunks in the background.

Flow (the scheduler calls these; see its `kvstore hook` comments):
- `lookup(req, num_hit)` on admission, after the in-engine prefix-cache hit of `num_hit` tokens:
  how many more tokens the store can supply (whole blocks, at least one token left to compute).
- `start_load(req, block_table, num_hit, num_ext)` once the blocks are allocated: the loader
  thread fetches, verifies and `scatter_blocks` each chunk into its blocks while the engine
  keeps stepping the other requests (vLLM v1's async KV-connector load).
- `finished_load(req)` at the start of each step: None while the load is in flight, then the
  tokens actually loaded (a chunk that turns out corrupt, vanished or unreadable ends the load
  there: the rest is simply computed).
- `on_computed(req)` after each step: prompt chunks that became full are queued for storing.
- `on_finish(req)` before the request's blocks are freed: the generated part's full chunks too,
  and an in-flight load is cancelled.

Neither direction blocks the step. The block pool is not thread-safe, so only the engine thread
touches it: before handing blocks to a background thread it takes an extra reference on them
(so they cannot be reused under the thread's feet, even if the request is aborted or preempted
meanwhile), and it drops those references once the thread is done. The background threads only
read or write the blocks' bytes (gather/scatter of whole blocks, disjoint from every block the
model reads or writes: a loading request's blocks are in no batch and not yet in the prefix
cache). Tiers are safe to call from several threads (memory: a lock; disk: atomic renames;
Redis: redis-py's connection pool).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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
class _LoadChunk:
    index: int  # chunk number in the request's chain
    name: str
    key: bytes
    tokens: list[int]
    tier: int  # fastest tier that held it at lookup
    lo: int  # tokens [lo, hi) of the request come from this chunk
    hi: int
    block_ids: list[int]  # the blocks of [lo, hi)


@dataclass(slots=True)
class _LoadResult:
    loaded: int = 0  # tokens written, from the load's start: whole verified chunks only
    full_chunks: int = 0  # leading chunks (of the chain) known to be in the store
    nbytes: int = 0
    seconds: float = 0.0


@dataclass(slots=True, eq=False)
class _LoadJob:
    request_id: str
    start: int  # first token loaded (the in-engine prefix-cache hit ends here)
    chunks: list[_LoadChunk]
    pinned: list  # KVBlock references the engine thread drops once the loader is done
    record_metrics: bool  # the request's first admission: its store-token count is this load's
    cancelled: bool = False  # set by the engine thread; the loader stops at the next chunk
    future: Future | None = None


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
        # Its own thread: a load is on some request's critical path, never queued behind stores.
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvstore-load")
        self._loads: dict[str, _LoadJob] = {}  # in flight, by request id
        self._cancelled: list[_LoadJob] = []  # aborted requests' loads still holding blocks

    # -- helpers ------------------------------------------------------------------------------

    def _state(self, req) -> _ReqState:
        st = self._reqs.get(req.request_id)
        if st is None:
            st = self._reqs[req.request_id] = _ReqState()
        return st

    def _keys(self, req, st: _ReqState, num_chunks: int) -> list[bytes]:
        if len(st.keys) < num_chunks:
            toks = req.all_token_ids[:num_chunks * self.chunk]
            st.keys += self.ks.chunk_keys(toks, len(st.keys), st.keys[-1] if st.keys else None,
                                          cache_salt=getattr(req, "cache_salt", None))
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
        self._reap_cancelled()
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

    def start_load(self, req, block_table: list[int], num_hit: int, num_ext: int,
                   record_metrics: bool = True) -> None:
        """Fill the blocks of tokens [num_hit, num_hit + num_ext) on the loader thread (the plan
        is the last lookup's); poll `finished_load` for the outcome."""
        st = self._state(req)
        first, tiers = st.plan
        c, bs = self.chunk, self.block_size
        start, end = num_hit, num_hit + num_ext
        tokens = req.all_token_ids
        chunks = []
        for n, tier in enumerate(tiers):
            i = first + n
            c0 = i * c
            if c0 >= end:
                break
            lo, hi = max(c0, start), min(c0 + c, end)
            key = st.keys[i]
            chunks.append(_LoadChunk(i, key_name(key), key, tokens[c0:c0 + c], tier, lo, hi,
                                     block_table[lo // bs:hi // bs]))
        pinned = self.kv.req_blocks[req.request_id][start // bs:end // bs]
        self.kv.pool.touch(pinned)
        job = _LoadJob(req.request_id, start, chunks, pinned, record_metrics)
        job.future = self._loader.submit(self._load, job)
        self._loads[req.request_id] = job

    def finished_load(self, req) -> int | None:
        """None while the request's load is in flight; then, once, the tokens it loaded (0 if
        the request has no load)."""
        job = self._loads.get(req.request_id)
        if job is None:
            return 0
        if not job.future.done():
            return None
        del self._loads[req.request_id]
        res = self._release_load(job)
        st = self._state(req)
        st.stored = max(st.stored, res.full_chunks)  # in the store already: never store them again
        if job.record_metrics:
            st.store_tokens = res.loaded
        return res.loaded

    def wait_for_loads(self, reqs: list, timeout: float) -> bool:
        """Block until one of these requests' loads finishes or `timeout` s pass; True if one did."""
        futures = [self._loads[r.request_id].future for r in reqs if r.request_id in self._loads]
        if not futures:
            return True
        done, _ = wait(futures, timeout, return_when=FIRST_COMPLETED)
        return bool(done)

    def _cancel_load(self, request_id: str) -> None:
        job = self._loads.pop(request_id, None)
        if job is not None:
            job.cancelled = True
            self._cancelled.append(job)

    def _reap_cancelled(self) -> None:
        """Drop the block references of cancelled loads the loader is done with (engine thread)."""
        if not self._cancelled:
            return
        still = []
        for job in self._cancelled:
            if job.future.done():
                self._release_load(job)
            else:
                still.append(job)
        self._cancelled = still

    def _release_load(self, job: _LoadJob) -> _LoadResult:
        res = job.future.result()  # _load never raises
        self.kv.pool.free(list(reversed(job.pinned)))
        stats = self.store.stats
        with self.store._lock:
            stats.load_chunks += -(-res.loaded // self.chunk)
            stats.load_bytes += res.nbytes
            stats.load_seconds += res.seconds
        return res

    # -- the loader thread --------------------------------------------------------------------

    def _load(self, job: _LoadJob) -> _LoadResult:
        res, t0 = _LoadResult(), time.perf_counter()
        try:
            for ch in job.chunks:
                if job.cancelled:
                    break
                got = self.store.get(ch.name, ch.key, self.fields, ch.tokens, ch.tier)
                if got is None or not self._shape_ok(got[0], ch.name):
                    break
                self._scatter(got[0], ch)
                res.loaded = ch.hi - job.start
                res.nbytes += got[0][:, :, :ch.hi - ch.lo].numel() * got[0].element_size()
                if ch.hi == (ch.index + 1) * self.chunk:
                    res.full_chunks = ch.index + 1
        except Exception:  # a failed load is a miss: the tokens after the last good chunk are computed
            logger.exception("kvstore: loading request %s's KV failed; recomputing", job.request_id)
        res.seconds = time.perf_counter() - t0
        return res

    def _shape_ok(self, t: torch.Tensor, name: str) -> bool:
        if t.dtype == self.attn_ops[0].k_cache.dtype and tuple(t.shape) == self._chunk_shape():
            return True
        logger.warning("kvstore: entry %s has shape %s %s, expected %s; recomputing",
                       name, tuple(t.shape), t.dtype, self._chunk_shape())
        return False

    def _scatter(self, t: torch.Tensor, ch: _LoadChunk) -> None:
        """Write the chunk's tokens [lo, hi) into their blocks of every attention layer."""
        bs, c0 = self.block_size, ch.index * self.chunk
        ids = torch.tensor(ch.block_ids, dtype=torch.long)
        for layer, op in enumerate(self.attn_ops):
            kv_shape = (len(ids), bs, *op.k_cache.shape[2:])
            ops.scatter_blocks(t[layer, 0, ch.lo - c0:ch.hi - c0].view(kv_shape), op.k_cache, ids)
            ops.scatter_blocks(t[layer, 1, ch.lo - c0:ch.hi - c0].view(kv_shape), op.v_cache, ids)

    def _chunk_shape(self) -> tuple[int, ...]:
        op = self.attn_ops[0]
        return (len(self.attn_ops), 2, self.chunk, *op.k_cache.shape[2:])

    # -- storing ------------------------------------------------------------------------------

    def on_computed(self, req) -> None:
        """After a step: queue the prompt's chunks that are now fully computed."""
        self._release_done()
        self._reap_cancelled()
        self._store_upto(req, min(req.num_computed_tokens, req.num_prompt_tokens))

    def on_finish(self, req, ok: bool) -> None:
        """Before the blocks are freed: queue every full chunk whose KV is written (prompt and
        generated), unless the request failed (its KV may be garbage). An in-flight load is
        cancelled; its blocks stay referenced here until the loader thread lets go of them."""
        self._cancel_load(req.request_id)
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
        """Wait until every queued chunk is stored and every cancelled load has let go of its
        blocks (engine thread)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._cancelled:
            wait([j.future for j in self._cancelled], timeout)
            self._reap_cancelled()
            if deadline is not None and time.monotonic() > deadline:
                return
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
        for rid in list(self._loads):  # requests still loading will never be scheduled now
            self._cancel_load(rid)
        self._loader.shutdown(wait=True)
        self._reap_cancelled()
        self.flush()
        self._q.put(None)
        self._worker.join(timeout=5)
        self.store.close()
