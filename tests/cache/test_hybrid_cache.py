"""Hybrid KV cache: sliding-window groups free the blocks that fell out of the window (exact
boundaries), groups share one pool (capacity), preemption, and the linear-attention state pool
driven by the scheduler with a fake model."""
from __future__ import annotations

import logging

import pytest
import torch

from opdisagg_rt.cache.block_pool import NULL_BLOCK
from opdisagg_rt.cache.kv_cache_manager import KVCacheManager, KVCacheSpec, KVGroupSpec
from opdisagg_rt.cache.state_pool import StatePool, StateSpec
from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.layers.base import Op
from opdisagg_rt.model_runner import ModelRunner
from opdisagg_rt.sampling import SamplingParams
from opdisagg_rt.scheduler.request import Request, RequestStatus
from opdisagg_rt.scheduler.scheduler import Scheduler

BS = 4


def _req(rid, n, max_tokens=100, start=0):
    return Request(rid, list(range(start, start + n)), SamplingParams(temperature=0, max_tokens=max_tokens))


def _spec(*windows):
    return KVCacheSpec([KVGroupSpec((f"layers.{i}.attn",), w) for i, w in enumerate(windows)])


def _live_positions(kv, rid, g):
    blocks = kv.group_blocks[g][rid]
    return {i * BS + o for i, b in enumerate(blocks) if b is not NULL_BLOCK for o in range(BS)}


@pytest.mark.parametrize("window", [1, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_window_frees_exactly_the_dead_blocks(window, chunk):
    """A query at p reads keys (p - window, p]: before a step whose first query is at c, every
    block wholly below c - window + 1 is freed, and every key a query of the step reads is live."""
    kv = KVCacheManager(256, BS, enable_prefix_caching=False, spec=_spec(None, window))
    req = _req("a", 60)
    freed_before = 0
    while req.num_computed_tokens < 60:
        c = req.num_computed_tokens
        n = min(chunk, 60 - c)
        assert kv.allocate_slots(req, n)
        dead_blocks = max(c - window + 1, 0) // BS
        assert kv.num_window_freed_blocks == dead_blocks  # group 1 only: the full group keeps all
        assert [b is NULL_BLOCK for b in kv.group_blocks[1]["a"][:dead_blocks]] == [True] * dead_blocks
        needed = {k for p in range(c, c + n) for k in range(max(p - window + 1, 0), p + 1)}
        assert needed <= _live_positions(kv, "a", 1)
        assert set(range(c + n)) <= _live_positions(kv, "a", 0)
        # tight: the first block kept holds the first key the step reads (freeing it would lose it)
        assert dead_blocks * BS <= min(needed) < (dead_blocks + 1) * BS
        assert kv.num_window_freed_blocks >= freed_before
        freed_before = kv.num_window_freed_blocks
        req.num_computed_tokens += n
    assert kv.block_table("a", 1)[:dead_blocks] == [0] * dead_blocks  # freed entries read as id 0
    kv.free(req)
    assert kv.pool.num_free_blocks == 256


def test_decode_holds_at_most_window_blocks_plus_one():
    kv = KVCacheManager(64, BS, False, spec=_spec(10))
    req = _req("a", 3)
    peak = 0
    for step in range(80):
        n = 3 if step == 0 else 1
        assert kv.allocate_slots(req, n)
        peak = max(peak, kv.num_live_blocks("a"))
        req.num_computed_tokens += n
    assert peak == -(-10 // BS) + 1


def test_prefix_caching_disabled_for_linear_attention(caplog):
    pool = StatePool({"l": StateSpec((2,), (2, 2))}, 2)
    with caplog.at_level(logging.WARNING):
        kv = KVCacheManager(16, BS, True, spec=KVCacheSpec([KVGroupSpec()], pool))
    assert not kv.enable_prefix_caching and "linear-attention" in kv.prefix_caching_disabled_reason
    assert "prefix caching disabled" in caplog.text and kv.get_computed_blocks(_req("a", 20)) == ([], 0)
    assert KVCacheManager(16, BS, True, spec=_spec(None, 8)).enable_prefix_caching  # windows keep it


def _finish(kv, req):
    """Compute the whole request (no decode) and register its blocks, as the scheduler would."""
    assert kv.allocate_slots(req, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req, req.num_tokens)
    kv.free(req)


@pytest.mark.parametrize("window", [3, 4, 5, 8])
def test_window_prefix_hit_needs_only_the_window_blocks(window):
    kv = KVCacheManager(64, BS, True, spec=_spec(None, window))
    _finish(kv, _req("a", 30))
    b = _req("b", 30)  # same 30 tokens: 29 may hit -> 7 full blocks
    hits, n = kv.get_computed_blocks(b)
    assert n == 28
    first = (28 - window + 1) // BS
    assert [x is NULL_BLOCK for x in hits[1]] == [True] * first + [False] * (7 - first)
    assert kv.allocate_slots(b, 2, hits)
    # Evict one block the first computed query (position 28) needs in the window group: the hit
    # shrinks to the largest j whose window blocks [(4j - w + 1)//4, j) are all cached.
    kv.free(b)
    kv2 = KVCacheManager(64, BS, True, spec=_spec(None, window))
    _finish(kv2, _req("a", 30))
    victim = kv2.pool.cached[KVCacheManager._group_key(_hashes(kv2, 30)[6], 1)]
    kv2.pool._evict(victim)
    hits, n = kv2.get_computed_blocks(_req("c", 30))
    # j = 7 needs block 6 (the last key before position 28): the hit drops to j = 6, whose window
    # blocks [(24 - w + 1) // 4, 6) are all there; the full group keeps its 6 leading blocks
    assert n == 6 * BS and len(hits[0]) == 6 and all(x is not NULL_BLOCK for x in hits[0])
    assert hits[1][(24 - window + 1) // BS:] == [kv2.pool.cached[KVCacheManager._group_key(h, 1)]
                                                 for h in _hashes(kv2, 30)[(24 - window + 1) // BS:6]]
    # a block below every window is not needed: evicting block 0 leaves the hit whole
    kv3 = KVCacheManager(64, BS, True, spec=_spec(window))
    _finish(kv3, _req("a", 30))
    kv3.pool._evict(kv3.pool.cached[_hashes(kv3, 30)[0]])
    assert kv3.get_computed_blocks(_req("d", 30))[1] == 28


def _hashes(kv, n):
    r = _req("h", n)
    kv._update_hashes(r, n)
    return r.block_hashes


def _ops(windows, kv_heads=2, head_dim=8):
    return [AttentionOp(f"layers.{i}.attn", 4, kv_heads if not isinstance(kv_heads, list) else kv_heads[i],
                        head_dim, None, window=w) for i, w in enumerate(windows)]


def test_runner_groups_share_one_pool():
    elem = 4  # float32
    one = 2 * BS * 2 * 8 * elem
    # Gemma-3 style 5:1 -> six one-layer groups, full first; a block id is one layer's K/V
    r = ModelRunner(_ops([8, 8, 8, 8, 8, None]), BS, torch.float32)
    groups, where, pairs = r.kv_layout()
    assert [g.window for g in groups] == [None, 8, 8, 8, 8, 8] and pairs == 1
    assert r.block_bytes() == one
    n = r.allocate_kv_cache(100 * one)
    assert n == 100 and r.attn_ops[0].k_cache is r.attn_ops[5].k_cache  # shared tensor pair
    assert {op.kv_group for op in r.attn_ops} == set(range(6))
    # 4 sliding + 2 full: gcd 2 -> groups of two layers
    r = ModelRunner(_ops([4, None, 4, None, 4, 4]), BS, torch.float32)
    groups, _, _ = r.kv_layout()
    assert [(g.window, len(g.layer_names)) for g in groups] == [(None, 2), (4, 2), (4, 2)]
    assert r.block_bytes() == 2 * one
    # one window type: one group, one tensor pair per layer (the layout of a plain model)
    r = ModelRunner(_ops([None, None, None]), BS, torch.float32)
    assert len(r.kv_layout()[0]) == 1 and r.block_bytes() == 3 * one
    # different KV shapes: no sharing, every block id has room in every layer
    r = ModelRunner(_ops([4, None], kv_heads=[2, 1]), BS, torch.float32)
    assert r.block_bytes() == one + one // 2 and len(r.kv_layout()[0]) == 2


def test_prepare_builds_per_group_tables_and_slots():
    r = ModelRunner(_ops([None, 8]), BS, torch.float32)
    r.allocate_kv_cache(64 * r.block_bytes())
    kv = KVCacheManager(64, BS, False, spec=r.kv_spec)
    s = Scheduler(kv, 4, 64, 1024)
    s.add_request(_req("a", 10))
    out = s.schedule()
    batch = r.prepare(out.scheduled)
    t0, t1 = kv.block_table("a", 0), kv.block_table("a", 1)
    assert set(t0).isdisjoint(t1)  # one pool, a block belongs to one group
    pos = torch.arange(10)
    assert batch.group_slot_mappings[1].tolist() == (torch.tensor(t1)[pos // BS] * BS + pos % BS).tolist()
    assert batch.slot_mapping.tolist() == (torch.tensor(t0)[pos // BS] * BS + pos % BS).tolist()
    batch.select_group(1)
    assert batch.block_tables.tolist() == [t1] and batch.slot_mapping is batch.group_slot_mappings[1]


def _fake_step(s: Scheduler, token=7):
    out = s.schedule()
    got = s.update_from_output(out, {x.request.request_id: token for x in out.scheduled if x.samples})
    for r in got:
        if len(r.output_token_ids) >= r.sampling_params.max_tokens:
            s.finish(r, RequestStatus.FINISHED_LENGTH)
    return out


def test_windows_fit_more_sequences_than_full_attention():
    """40 blocks, 10 requests of 8 + 40 tokens: full attention needs 12 blocks each (3 fit at
    once: preemptions follow); a window of 8 holds <= 3 blocks each, so all 10 run together."""
    results = {}
    for name, windows in (("full", (None,)), ("window", (8,))):
        s = Scheduler(KVCacheManager(40, BS, False, spec=_spec(*windows)), 16, 256, 1024)
        for i in range(10):
            s.add_request(_req(str(i), 8, max_tokens=40, start=100 * i))
        peak = 0
        for _ in range(5000):
            if not s.has_unfinished():
                break
            _fake_step(s)
            peak = max(peak, len(s.running))
        assert not s.has_unfinished()
        results[name] = (peak, s.num_preemptions)
        assert s.kv.pool.num_free_blocks == 40
    assert results["window"] == (10, 0)
    assert results["full"][1] >= 10  # full attention runs out of blocks and keeps preempting


def test_preemption_frees_every_group_and_recomputes():
    # one request needs <= 10 full + 3 window blocks: alone it fits in 16, two together do not
    kv = KVCacheManager(16, BS, False, spec=_spec(None, 8))
    s = Scheduler(kv, 4, 64, 1024)
    s.add_request(_req("a", 8, max_tokens=30))
    s.add_request(_req("b", 8, max_tokens=30, start=50))
    seen_preempt = False
    for _ in range(500):
        if not s.has_unfinished():
            break
        out = _fake_step(s)
        for r in out.preempted:
            seen_preempt = True
            assert r.num_computed_tokens == 0 and r.request_id not in kv.group_blocks[0]
            assert r.request_id not in kv.group_blocks[1]
        used = sum(kv.num_live_blocks(r.request_id, g) for r in s.running for g in (0, 1))
        assert used + kv.pool.num_free_blocks == 16  # nothing leaks
    assert not s.has_unfinished()
    assert seen_preempt and kv.pool.num_free_blocks == 16


# -- linear-attention state pool ---------------------------------------------------------------


class CountingStateOp(Op):
    """A fake linear-attention layer: its recurrent state counts the tokens it has folded in,
    so a state that survived a preemption (and is then fed the recomputed prompt) is caught."""
    name = "layers.0.attn"

    def __init__(self):
        self.reads, self.writes = (), ("logits",)

    def state_spec(self) -> StateSpec:
        return StateSpec(conv_shape=(3, 2), recurrent_shape=(2, 2))

    def bind_state(self, conv, recurrent):
        self.conv, self.rec = conv, recurrent

    def forward(self, t, batch):
        for r, idx in enumerate(batch.state_indices.tolist()):
            assert idx >= 0
            n = batch.query_lens_list[r]
            self.rec[idx] += n
            self.conv[idx, 0, 0] = batch.seq_lens_list[r]
        t["logits"] = torch.zeros(len(batch.logits_indices), 16)


def _state_setup(slots=2, blocks=64):
    op = CountingStateOp()
    runner = ModelRunner([op], BS, torch.float32, max_num_seqs=slots)
    runner.allocate_kv_cache(1 << 20)
    kv = KVCacheManager(blocks, BS, True, spec=runner.kv_spec)
    return op, runner, kv


def _run_step(s, runner, token=7):
    out = s.schedule()
    if out.scheduled:
        batch = runner.prepare(out.scheduled)
        assert batch.state_indices.tolist() == [x.state_index for x in out.scheduled]
        runner.execute(batch)
    got = s.update_from_output(out, {x.request.request_id: token for x in out.scheduled if x.samples})
    for r in got:
        if len(r.output_token_ids) >= r.sampling_params.max_tokens:
            s.finish(r, RequestStatus.FINISHED_LENGTH)
    return out


def test_state_pool_allocated_on_schedule_freed_on_finish():
    op, runner, kv = _state_setup(slots=2)
    assert not kv.enable_prefix_caching
    s = Scheduler(kv, 8, 64, 1024)
    for i in range(3):
        s.add_request(_req(str(i), 5, max_tokens=4, start=10 * i))
    out = _run_step(s, runner)
    assert [x.request.request_id for x in out.scheduled] == ["0", "1"]  # only two state slots
    assert sorted(x.state_index for x in out.scheduled) == [0, 1] and len(s.waiting) == 1
    while s.has_unfinished():
        out = _run_step(s, runner)
        for x in out.scheduled:  # the state has folded in exactly the computed tokens
            r = x.request
            assert float(op.rec[x.state_index, 0, 0]) == r.num_computed_tokens
    assert kv.state_pool.num_free == 2 and kv.state_pool.num_allocations == 3


def test_state_reset_on_preemption_recomputes_correctly():
    op, runner, kv = _state_setup(slots=4, blocks=6)
    s = Scheduler(kv, 4, 64, 1024)
    s.add_request(_req("a", 6, max_tokens=12))
    s.add_request(_req("b", 6, max_tokens=12, start=40))
    preempted = 0
    while s.has_unfinished():
        out = _run_step(s, runner)
        preempted += len(out.preempted)
        for r in out.preempted:
            assert kv.state_index(r.request_id) == -1  # its slot went back to the pool
        for x in out.scheduled:
            assert float(op.rec[x.state_index, 0, 0]) == x.request.num_computed_tokens
    assert preempted > 0 and kv.state_pool.num_free == 4


def test_abort_frees_the_state_slot():
    op, runner, kv = _state_setup(slots=1)
    s = Scheduler(kv, 4, 64, 1024)
    s.add_request(_req("a", 5))
    s.add_request(_req("b", 5, start=9))
    _run_step(s, runner)
    assert kv.state_index("a") == 0 and kv.state_index("b") == -1
    op.rec[0] += 100
    s.abort("a")
    out = _run_step(s, runner)
    assert [x.request.request_id for x in out.scheduled] == ["b"] and out.scheduled[0].state_index == 0
    assert float(op.rec[0, 0, 0]) == 5  # zeroed when handed to b, then b's 5 prompt tokens
