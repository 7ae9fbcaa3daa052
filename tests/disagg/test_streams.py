"""StreamScheduler: the engine's budget split evenly over the request streams."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from opdisagg_rt.cache.kv_cache_manager import KVCacheManager
from opdisagg_rt.disagg.streams import StreamScheduler
from opdisagg_rt.sampling import SamplingParams
from opdisagg_rt.scheduler.request import Request, RequestStatus
from opdisagg_rt.scheduler.scheduler import Scheduler


@pytest.mark.parametrize("num_streams", [2, 3])
def test_every_stream_gets_an_equal_share_of_the_budget(num_streams):
    base = Scheduler(KVCacheManager(256, 4, False), 64, 2048, 1024)
    streams = StreamScheduler(base, SimpleNamespace(num_streams=num_streams))
    assert [s.max_num_seqs for s in streams.scheds] == [64 // num_streams] * num_streams
    assert [s.max_num_batched_tokens for s in streams.scheds] == [2048 // num_streams] * num_streams


def test_streams_prefill_equal_chunks():
    """Equal prompts spread over two streams are chunked alike in each stream (a stream with a
    smaller budget would hold the pipeline for more prefill steps than the other)."""
    base = Scheduler(KVCacheManager(256, 4, False), 8, 64, 1024)
    runner = SimpleNamespace(num_streams=2, collected_at={}, prepare=lambda s: s, submit=lambda k, b: None)
    streams = StreamScheduler(base, runner)
    for i in range(8):
        streams.add_request(Request(str(i), list(range(i * 100, i * 100 + 32)), SamplingParams(max_tokens=4)))
    first = streams.schedule()
    chunks = [out.num_batched_tokens for out in streams.inflight if out is not None] + [first.num_batched_tokens]
    assert chunks == [32, 32]


def test_an_idle_engine_counts_no_turnaround():
    """The gap between one generate() and the next is not the engine's turnaround of a stream."""
    runner = SimpleNamespace(num_streams=2, collected_at={}, prepare=lambda s: s, submit=lambda k, b: None)
    streams = StreamScheduler(Scheduler(KVCacheManager(16, 4, False), 8, 64, 1024), runner)
    streams.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=1)))
    out = streams.schedule()
    runner.collected_at[streams.current] = 1.0  # the runner collected the stream's step
    (req,) = streams.update_from_output(out, {"a": 7})
    streams.finish(req, RequestStatus.FINISHED_LENGTH)  # the last request: the engine goes idle
    assert not streams.has_unfinished()
    assert runner.collected_at == {}
