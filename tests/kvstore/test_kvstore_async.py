"""Async store loads (vLLM v1's WAITING_FOR_REMOTE_KVS): a request whose prefix the store holds
loads it on the connector's loader thread while the other requests keep decoding; outputs stay
token-identical (greedy, float32) to no store; an abort during the load never frees blocks the
loader still writes; a load that fails mid-way falls back to recomputing."""
from __future__ import annotations

import threading

import pytest
import torch

from opdisagg_rt.engine import Engine
from opdisagg_rt.kvstore.keys import key_name
from opdisagg_rt.kvstore.memory import MemoryTier
from opdisagg_rt.kvstore.tier import Tier
from opdisagg_rt.sampling import SamplingParams
from opdisagg_rt.scheduler.request import RequestStatus

CHUNK = 32  # two 16-token blocks
SP = SamplingParams(temperature=0, max_tokens=4)
LONG = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
GATE_TIMEOUT_S = 5.0  # a synchronous load would sit in get() this long, then the test fails


def prompt(seed: int, n: int = 100) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 40000, (n,), generator=g).tolist()


A, B = prompt(11), prompt(12)
ALT = A[:70] + prompt(13, 30)  # shares A's first two chunks


class GatedTier(Tier):
    """A memory tier whose get() blocks while the gate is closed (a slow tier the test controls)
    and can be told to raise on some entries (a tier failing mid-load)."""

    def __init__(self):
        self.inner = MemoryTier(256 << 20)
        self.name, self.verify = "gated", True
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a get() is waiting at the closed gate
        self.timed_out = False
        self.gets = 0
        self.fail: set[str] = set()

    def contains_many(self, names):
        return self.inner.contains_many(names)

    def get(self, name):
        self.gets += 1
        if not self.gate.is_set():
            self.entered.set()
            self.timed_out |= not self.gate.wait(GATE_TIMEOUT_S)
        if name in self.fail:
            raise ConnectionError("tier failed mid-load")
        return self.inner.get(name)

    def put(self, name, blob):
        self.inner.put(name, blob)

    def delete(self, name):
        self.inner.delete(name)


def engine(model, kv_store=None, prefix=False) -> Engine:
    return Engine(model, dtype="float32", kv_cache_memory=32 << 20, enable_prefix_caching=prefix,
                  num_threads=1, kv_store=kv_store, kv_store_chunk_size=CHUNK)


def run(e: Engine, *prompts, sp=SP):
    outs = e.generate(list(prompts), sp, use_tqdm=False)
    if e.kv_connector is not None:
        e.kv_connector.flush()
    return outs


def drain(e: Engine) -> dict:
    """Step to the end; the final output of each request by id."""
    done = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                done[o.request_id] = o
    return done


@pytest.fixture(scope="module")
def reference(smollm2):
    """Tokens without any store: the ground truth."""
    e = engine(smollm2)
    a, b, alt = run(e, A, B, ALT)
    b_long = run(e, B, sp=LONG)[0]
    return {"A": a.token_ids, "B": b.token_ids, "ALT": alt.token_ids, "B_long": b_long.token_ids}


@pytest.fixture
def stored(smollm2):
    """An engine whose gated store holds A's chunks."""
    tier = GatedTier()
    e = engine(smollm2, [tier])
    run(e, A)
    yield e, tier
    tier.gate.set()
    e.shutdown()


def test_decodes_run_while_a_load_is_in_flight(stored, reference):
    e, tier = stored
    e.add_request(B, LONG, request_id="b")
    got = {"b": []}
    while len(got["b"]) < 2:  # B is decoding
        for o in e.step():
            got["b"] += o.token_ids_delta
    tier.gate.clear()
    e.add_request(A, SP, request_id="a")
    for o in e.step():  # admits A: its load starts and blocks in the tier
        got.setdefault(o.request_id, []).extend(o.token_ids_delta)
    assert tier.entered.wait(GATE_TIMEOUT_S)
    a = e.scheduler.requests["a"]
    before = len(got["b"])
    for _ in range(3):
        for o in e.step():
            got.setdefault(o.request_id, []).extend(o.token_ids_delta)
    # B made progress while A's load was still stuck in the tier (a synchronous load would have
    # held the whole engine step inside get() until the gate timed out).
    assert not tier.timed_out and not tier.gate.is_set()
    assert len(got["b"]) >= before + 3 and "a" not in got
    assert a.status is RequestStatus.WAITING_FOR_REMOTE_KVS and e.scheduler.loading == [a]
    tier.gate.set()
    done = drain(e)
    assert done["a"].token_ids == reference["A"] and done["b"].token_ids == reference["B_long"]
    m = done["a"].metrics
    assert (m.num_cached_tokens, m.num_store_tokens, m.num_computed_prompt_tokens) == (0, 96, 4)
    assert m.first_scheduled_time <= m.first_token_time


def test_async_hits_are_token_identical_to_no_store(stored, reference):
    """A full hit and a partial hit, loading while a third request prefills and decodes."""
    e, _ = stored
    a, alt, b = run(e, A, ALT, B)
    assert (a.metrics.num_store_tokens, alt.metrics.num_store_tokens, b.metrics.num_store_tokens) == (96, 64, 0)
    assert [a.token_ids, alt.token_ids, b.token_ids] == [reference["A"], reference["ALT"], reference["B"]]
    s = e.kv_connector.stats()
    assert s["load_chunks"] == 5 and s["load_bytes"] > 0 and s["corrupt"] == 0


def test_abort_while_loading_defers_freeing_the_blocks(stored, reference):
    e, tier = stored
    pool = e.kv.pool
    tier.gate.clear()
    e.add_request(A, SP, request_id="a")
    assert e.step() == []  # nothing to compute yet: A is loading
    assert tier.entered.wait(GATE_TIMEOUT_S)
    loading = e.kv.block_table("a")
    assert len(loading) == 6 and e.scheduler.requests["a"].status is RequestStatus.WAITING_FOR_REMOTE_KVS
    assert e.abort("a") and not e.has_unfinished_requests()
    # The loader thread is still inside the load: its blocks must not be handed out again.
    assert not set(loading) & set(pool.free_queue)
    b = e.generate([B], SP, use_tqdm=False)[0]  # other requests run meanwhile, on other blocks
    assert b.token_ids == reference["B"] and not tier.timed_out
    assert not set(loading) & set(pool.free_queue)
    tier.gate.set()
    e.kv_connector.flush()  # the cancelled load ends after its current chunk and lets go
    assert tier.gets == 1 and set(loading) <= set(pool.free_queue)
    assert pool.num_free_blocks == pool.num_blocks
    out = run(e, A)[0]  # and the engine serves A again from the store
    assert out.token_ids == reference["A"] and out.metrics.num_store_tokens == 96


def test_tier_failing_mid_load_falls_back_to_recompute(stored, reference):
    e, tier = stored
    keys = e.kv_connector.ks.chunk_keys(A)
    tier.fail = {key_name(keys[1])}  # chunk 0 loads, chunk 1 raises
    out = run(e, A)[0]
    assert out.metrics.num_store_tokens == 32 and out.metrics.num_computed_prompt_tokens == 68
    assert out.token_ids == reference["A"] and e.kv_connector.stats()["errors"] == 1


def test_loader_exception_mid_load_falls_back_to_recompute(stored, reference, monkeypatch, caplog):
    """Anything raising inside the loader (here the scatter of the second chunk) is a miss from
    that chunk on, even with that chunk's blocks half written."""
    e, _ = stored
    conn = e.kv_connector
    real, calls = conn._scatter, []

    def scatter(t, ch):
        calls.append(ch.index)
        if len(calls) == 2:
            real(t, ch)  # write it, then fail as if half-way through
            raise RuntimeError("scatter failed")
        real(t, ch)

    monkeypatch.setattr(conn, "_scatter", scatter)
    out = run(e, A)[0]
    assert out.metrics.num_store_tokens == 32 and out.token_ids == reference["A"]
    assert "loading request" in caplog.text
