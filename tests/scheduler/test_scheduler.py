from opdisagg_rt.cache.kv_cache_manager import KVCacheManager
from opdisagg_rt.sampling import SamplingParams
from opdisagg_rt.scheduler.request import Request, RequestStatus
from opdisagg_rt.scheduler.scheduler import Scheduler


def _sched(num_blocks=64, block_size=4, max_seqs=8, budget=32, caching=True):
    return Scheduler(KVCacheManager(num_blocks, block_size, caching), max_seqs, budget, 1024)


def _req(rid, n, start=0):
    return Request(rid, list(range(start, start + n)), SamplingParams(temperature=0, max_tokens=100))


def _run(s: Scheduler, out, token=7):
    """Pretend the model ran: every request that caught up gets `token`."""
    return s.update_from_output(out, {x.request.request_id: token for x in out.scheduled if x.samples})


def test_token_budget_chunks_prefill_and_mixes_decodes():
    s = _sched(budget=10)
    s.add_request(_req("a", 4))
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 4)]
    _run(s, out)
    s.add_request(_req("b", 25, start=100))
    out = s.schedule()
    # running request first (a decode), then the waiting prompt gets the rest of the budget
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    _run(s, out)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    _run(s, out)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 7)]
    assert out.scheduled[1].samples
    assert out.num_batched_tokens == 8


def test_decodes_come_first_in_the_batch():
    s = _sched(budget=100)
    s.add_request(_req("a", 5))
    _run(s, s.schedule())
    s.add_request(_req("b", 6, start=50))
    s.running.reverse()  # even if the prefill is ahead in the running list
    out = s.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [1, 6]


def test_max_num_seqs():
    s = _sched(max_seqs=2, budget=100)
    for i in range(3):
        s.add_request(_req(str(i), 3, start=10 * i))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_preemption_by_recompute_when_blocks_run_out():
    s = _sched(num_blocks=4, block_size=4, budget=100, caching=False)
    s.add_request(_req("a", 7))
    s.add_request(_req("b", 7, start=50))
    out = s.schedule()  # 2 blocks each: pool full
    _run(s, out)
    a, b = s.requests["a"], s.requests["b"]
    assert a.num_tokens == 8 and b.num_tokens == 8
    out = s.schedule()  # a decodes into its 2nd block's last slot; b too
    _run(s, out)
    out = s.schedule()  # now both need a 3rd block: b (admitted last) is preempted
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and s.waiting[0] is b
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    _run(s, out)
    s.finish(a, RequestStatus.FINISHED_LENGTH)
    out = s.schedule()  # b is recomputed from scratch over prompt + its output so far
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("b", 9)]
    assert out.scheduled[0].samples


def test_abort_frees_blocks():
    s = _sched()
    s.add_request(_req("a", 9))
    s.add_request(_req("b", 9, start=30))
    _run(s, s.schedule())
    free_before = s.kv.pool.num_free_blocks
    assert s.abort("a")
    assert s.requests.get("a") is None and s.kv.pool.num_free_blocks > free_before
    assert not s.abort("a")
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["b"]


def test_prefix_cache_hit_on_admission():
    s = _sched(budget=100)
    s.add_request(_req("a", 12))
    _run(s, s.schedule())
    s.add_request(_req("b", 14))  # shares the first 12 tokens: 3 full blocks of 4
    out = s.schedule()
    b = s.requests["b"]
    assert b.num_cached_tokens == 12
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 2)]
