"""Continuous batching under one token budget per step (vLLM v1 semantics).

There are no prefill/decode phases: every step each running request asks for the tokens it has
not computed yet (one for a decode, a chunk of prompt for a prefill), running requests first,
then waiting ones, until the budget is spent. When KV blocks run out, the most recently admitted
running request is preempted and later recomputed.

External KV store (kvstore connector), as vLLM v1 does async KV-connector loads: a waiting
request whose prefix the store holds gets its blocks on admission, its load starts on the
connector's loader thread, and it waits in `loading` (status WAITING_FOR_REMOTE_KVS) while the
other requests keep running. At the start of each schedule() finished loads are collected: the
request joins `running` with num_computed_tokens advanced by the tokens actually loaded (a
failed chunk and everything after it are simply computed). Loading requests are never preempted
(they are not in `running`), and count against max_num_seqs so their move to `running` never
exceeds it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from opdisagg_rt.cache.kv_cache_manager import KVCacheManager
from opdisagg_rt.scheduler.request import Request, RequestStatus

# With nothing else to run, schedule() waits this long for a store load to finish instead of
# spinning the engine loop (short: a new request arriving meanwhile waits at most this long).
LOAD_WAIT_S = 0.01


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_table: list[int]  # KV cache group 0's (the only group of a full-attention model)
    # Hybrid models: every KV cache group's block table (group 0's first); None = [block_table].
    group_block_tables: list[list[int]] | None = None
    state_index: int = -1  # the request's linear-attention state slot (-1: none)

    @property
    def samples(self) -> bool:
        """Whether this step brings the request up to date, so its next token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # decodes (one new token) first, then prefills
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if s.num_new_tokens == 1)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, connector=None):
        self.kv = kv
        self.connector = connector  # kvstore hook: opdisagg_rt.kvstore.KVConnector or None
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: list[Request] = []  # WAITING_FOR_REMOTE_KVS, in admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> SchedulerOutput:
        self._finish_loads()
        out = self._schedule()
        # Only loads are in flight: sleep until one finishes rather than busy-loop the engine.
        if (not out.scheduled and not out.preempted and self.loading
                and self.connector.wait_for_loads(self.loading, LOAD_WAIT_S)):
            self._finish_loads()
            out = self._schedule()
        return out

    def _finish_loads(self) -> None:
        """Loaded requests become running, their loaded tokens counted as computed."""
        for req in list(self.loading):
            loaded = self.connector.finished_load(req)  # None while the load is in flight
            if loaded is None:
                continue
            self.loading.remove(req)
            req.num_computed_tokens += loaded
            # Verified KV, as good as computed: shareable through the prefix cache from now on
            # (not earlier: a block must not be found while the loader thread still writes it).
            self.kv.cache_full_blocks(req, req.num_computed_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: no room for anything else
        if not preempted:
            self._admit_waiting(scheduled, budget)
        # Rows of single-token queries first: the layout split decode/prefill kernels expect.
        scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        now = time.perf_counter()
        for s in scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        return SchedulerOutput(scheduled, preempted, sum(s.num_new_tokens for s in scheduled))

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        rid = req.request_id
        tables = self.kv.block_tables(rid) if self.kv.num_groups > 1 else None
        return ScheduledRequest(req, num_new, tables[0] if tables else self.kv.block_table(rid), tables,
                                self.kv.state_index(rid))

    def _admit_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        while (self.waiting and budget > 0
               and len(self.running) + len(self.loading) < self.max_num_seqs):
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req)
            # kvstore hook: tokens past the in-engine hit that the external store can supply.
            num_ext = self.connector.lookup(req, num_hit) if self.connector is not None else 0
            if num_ext:
                if not self.kv.allocate_slots(req, num_ext, hits):
                    break
                self.waiting.popleft()
                self._start_load(req, num_hit, num_ext)
                continue  # a load takes no compute budget: admit the next one too
            num_new = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            self._on_admitted(req, num_hit)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

    def _on_admitted(self, req: Request, num_hit: int) -> bool:
        """Progress and first-admission metrics; True at the request's first admission."""
        req.num_computed_tokens = num_hit
        first = req.num_cached_tokens < 0
        if first:
            req.num_cached_tokens = num_hit
        return first

    def _start_load(self, req: Request, num_hit: int, num_ext: int) -> None:
        """kvstore hook: fill the blocks of tokens [num_hit, num_hit + num_ext) in the background."""
        first = self._on_admitted(req, num_hit)
        self.connector.start_load(req, self.kv.block_table(req.request_id), num_hit, num_ext,
                                  record_metrics=first)
        if req.first_scheduled_time is None:  # being served from here on: queueing ends
            req.first_scheduled_time = time.perf_counter()
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.loading.append(req)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens; returns requests that got a token.
        The caller decides which of them finished and calls finish()."""
        got_token = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(req, req.num_computed_tokens)
            if self.connector is not None:  # kvstore hook: store newly full chunks (background)
                self.connector.on_computed(req)
            token = sampled.get(req.request_id)
            if token is not None:
                req.output_token_ids.append(token)
                got_token.append(req)
        return got_token

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and free its blocks (finish, abort or error)."""
        if req.is_finished:
            return
        req.status = status
        req.finished_time = time.perf_counter()
        if req in self.running:
            self.running.remove(req)
        elif req in self.loading:
            self.loading.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.connector is not None:
            # kvstore hook: store the generated part before freeing; cancel an in-flight load
            # (the connector holds its own reference on the blocks the loader thread writes, so
            # freeing the request's blocks below cannot hand them to anyone before it is done).
            self.connector.on_finish(req, ok=status is not RequestStatus.FINISHED_ERROR)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return True
