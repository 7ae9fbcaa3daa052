"""The scheduler's side of async KV-store loads, with a fake connector whose loads finish when
the test says: loading requests wait (WAITING_FOR_REMOTE_KVS) while the others run, are never
preempted, count against max_num_seqs, and can be aborted."""
from __future__ import annotations

from opdisagg_rt.cache.kv_cache_manager import KVCacheManager
from opdisagg_rt.sampling import SamplingParams
from opdisagg_rt.scheduler.request import Request, RequestStatus
from opdisagg_rt.scheduler.scheduler import Scheduler


class FakeConnector:
    """A store that holds `hits[request_id]` tokens of each prompt; `done[request_id] = n`
    finishes that request's load with n tokens loaded."""

    def __init__(self, hits: dict[str, int]):
        self.hits = hits
        self.started: dict[str, tuple[int, int, list[int]]] = {}
        self.done: dict[str, int] = {}
        self.finished: list[str] = []

    def lookup(self, req, num_hit):
        return max(0, self.hits.get(req.request_id, 0) - num_hit)

    def start_load(self, req, block_table, num_hit, num_ext, record_metrics=True):
        self.started[req.request_id] = (num_hit, num_ext, list(block_table))

    def finished_load(self, req):
        return self.done.pop(req.request_id, None)

    def wait_for_loads(self, reqs, timeout):
        return False

    def on_computed(self, req):
        pass

    def on_finish(self, req, ok):
        self.finished.append(req.request_id)


def _sched(hits, num_blocks=64, max_seqs=8, budget=100):
    conn = FakeConnector(hits)
    return Scheduler(KVCacheManager(num_blocks, 4, True), max_seqs, budget, 1024, connector=conn), conn


def _req(rid, n, start=0):
    return Request(rid, list(range(start, start + n)), SamplingParams(temperature=0, max_tokens=100))


def _run(s: Scheduler, out, token=7):
    return s.update_from_output(out, {x.request.request_id: token for x in out.scheduled if x.samples})


def _ids(out):
    return [(x.request.request_id, x.num_new_tokens) for x in out.scheduled]


def test_loading_request_waits_while_others_run_then_resumes():
    s, conn = _sched({"l": 8})
    s.add_request(_req("l", 10))
    s.add_request(_req("b", 5, start=100))
    out = s.schedule()
    l = s.requests["l"]
    assert _ids(out) == [("b", 5)]  # the load takes no compute budget and no batch row
    assert l.status is RequestStatus.WAITING_FOR_REMOTE_KVS and s.loading == [l] and s.has_unfinished()
    assert conn.started["l"] == (0, 8, s.kv.block_table("l")) and len(s.kv.block_table("l")) == 2
    _run(s, out)
    out = s.schedule()
    assert _ids(out) == [("b", 1)]  # b decodes while l loads
    _run(s, out)
    conn.done["l"] = 8
    out = s.schedule()
    assert _ids(out) == [("b", 1), ("l", 2)] and l.num_computed_tokens == 8
    assert l.status is RequestStatus.RUNNING and not s.loading and l.num_cached_tokens == 0
    # The loaded blocks are verified KV: shared through the prefix cache from now on.
    s.add_request(_req("l2", 10))
    s.schedule()
    assert s.requests["l2"].num_cached_tokens == 8


def test_failed_load_recomputes_the_rest():
    s, conn = _sched({"l": 8})
    s.add_request(_req("l", 10))
    s.schedule()
    conn.done["l"] = 4  # the second block's chunk was corrupt
    out = s.schedule()
    assert _ids(out) == [("l", 6)] and s.requests["l"].num_computed_tokens == 4


def test_preemption_never_picks_a_loading_request():
    s, conn = _sched({"l": 8}, num_blocks=6)
    s.add_request(_req("l", 10))
    s.add_request(_req("b", 8, start=100))
    s.add_request(_req("c", 4, start=200))
    out = s.schedule()
    assert _ids(out) == [("b", 8), ("c", 4)]  # l loads into 2 blocks; 1 block left
    _run(s, out)
    l_blocks = s.kv.block_table("l")
    out = s.schedule()  # b takes the last block; c must go, not the (later admitted) loading l
    assert [r.request_id for r in out.preempted] == ["c"] and _ids(out) == [("b", 1)]
    assert s.loading == [s.requests["l"]] and s.kv.block_table("l") == l_blocks
    _run(s, out)
    conn.done["l"] = 8
    out = s.schedule()
    assert ("l", 2) in _ids(out)


def test_loading_requests_count_against_max_num_seqs():
    s, _ = _sched({"l": 8}, max_seqs=2)
    for rid, start in (("l", 0), ("b", 100), ("c", 200)):
        s.add_request(_req(rid, 10, start))
    out = s.schedule()
    assert _ids(out) == [("b", 10)] and [r.request_id for r in s.waiting] == ["c"]


def test_abort_while_loading():
    s, conn = _sched({"l": 8})
    s.add_request(_req("l", 10))
    s.schedule()
    free = s.kv.pool.num_free_blocks
    assert s.abort("l")
    # The connector hears of it (it keeps its own hold on blocks its loader still writes).
    assert conn.finished == ["l"] and not s.loading and not s.has_unfinished()
    assert s.kv.pool.num_free_blocks == free + 2 and s.schedule().scheduled == []
