"""The disaggregated engine on SmolLM2: token-identical to the colocated engine (greedy, float32,
with preemption and prefix caching), zero-copy shm, metadata caching, faults and clean shutdown."""
from __future__ import annotations

import os
import signal
import time

import pytest

from opdisagg_rt.engine import Engine
from opdisagg_rt.sampling import SamplingParams
from tests.disagg.conftest import ATTN_REST

PREFIX = "You are a helpful assistant. Answer in one short sentence, please. Question:"
PROMPTS = [PREFIX + q for q in (" What is the capital of France?", " Name a color.", " What is 2+2?",
                                " Who wrote Hamlet?")]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# 7 KV blocks of 16 tokens for 4 requests of ~26 tokens: the scheduler must preempt.
KW = dict(dtype="float32", kv_cache_memory=7 * 737280, max_model_len=128, max_num_batched_tokens=64, num_threads=1)


def run(engine):
    first = engine.generate(PROMPTS, PARAMS, use_tqdm=False)
    again = engine.generate(PROMPTS[:2], PARAMS, use_tqdm=False)  # the prefix is cached now
    return first + again


def tokens(outs):
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(smollm2):
    eng = Engine(smollm2, **KW)
    outs = run(eng)
    assert eng.scheduler.num_preemptions > 0, "the workload must exercise preemption"
    assert any(o.metrics.num_cached_tokens > 0 for o in outs[4:]), "and prefix caching"
    return tokens(outs)


def shm_files(engine) -> list[str]:
    names = engine.runner.shm_names()
    sems = [r.full._semlock.name for r in engine.runner.rings] + [r.free._semlock.name for r in engine.runner.rings]
    return [f"/dev/shm/{n}" for n in names] + [f"/dev/shm/sem.{s.lstrip('/')}" for s in sems]


def check_clean_shutdown(engine):
    files = shm_files(engine)
    pids = list(engine.runner.worker_pids().values())
    assert files and all(os.path.exists(f) for f in files if "sem." not in f)
    engine.shutdown()
    assert [f for f in files if os.path.exists(f)] == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


SPECS = {
    "attn_rest_mb1": ATTN_REST,
    "attn_rest_mb2": {**ATTN_REST, "micro_batches": 2},
    # micro-batches as independent request streams: continuous ping-pong across steps
    "attn_rest_streams2": {**ATTN_REST, "micro_batches": 2, "streams": True},
    "every_third_mlp_mb2": {"stages": {
        "main": {"device": "cpu", "ops": ["embed", "layers.*.attn_norm", "layers.*.qkv_proj", "layers.*.attn",
                                          "layers.*.o_proj", "layers.*.mlp_norm", "final_norm", "lm_head"]
                 + [f"layers.{i}.mlp" for i in range(30) if i % 3]},
        "mlp": {"device": "cpu", "ops": [f"layers.{i}.mlp" for i in range(0, 30, 3)]}}, "micro_batches": 2},
    "three_stages_mb2": {"stages": {
        "front": {"device": "cpu", "ops": ["embed", "layers.*.attn_norm", "layers.*.qkv_proj", "layers.*.o_proj",
                                           "layers.*.mlp_norm"]},
        "attn": {"device": "cpu", "ops": ["layers.*.attn"]},
        "ffn": {"device": "cpu", "ops": ["layers.*.mlp", "final_norm", "lm_head"]}}, "micro_batches": 2},
}


@pytest.mark.parametrize("name", list(SPECS))
def test_token_identical_to_colocated(smollm2, reference, name):
    eng = Engine(smollm2, stage_spec=SPECS[name], **KW)
    try:
        assert tokens(run(eng)) == reference
        assert eng.scheduler.num_preemptions > 0
        st = eng.runner.stats()
        mem = st["memory"]
        assert sum(m["attn_layers"] for m in mem.values()) == 30
        for s in eng.runner.spec.stages:  # a stage holds only its own operations' weights and caches
            assert mem[s.name]["num_ops"] == len(s.ops)
            assert (mem[s.name]["kv_cache_bytes"] > 0) == any(o.endswith(".attn") for o in s.ops)
            assert mem[s.name]["gc_frozen_objects"] > 0  # the stage's startup heap is out of the GC's way
        # zero copy: every activation a stage computed on was a view of a shared-memory slot
        recv = sum(h["recv_total"] for h in st["stages"].values())
        assert recv > 0 and sum(h["recv_inplace"] for h in st["stages"].values()) == recv
        per = st["per_step"]
        assert 0 < per["metadata_bytes_cached"] < per["metadata_bytes_uncached"]
        print(name, {k: round(v) for k, v in per.items()})
    finally:
        check_clean_shutdown(eng)


def test_dist_transport_over_loopback(smollm2, reference):
    """Two stages that talk only through torch.distributed (gloo) as if on two hosts."""
    eng = Engine(smollm2, stage_spec={**ATTN_REST, "transport": "dist"}, **KW)
    try:
        assert not eng.runner.rings  # no shared-memory channel at all
        assert tokens(run(eng)) == reference
    finally:
        eng.shutdown()


FAULT_KW = dict(KW, kv_cache_memory=32 * 737280)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_or_hung_stage_fails_requests_in_bounded_time(smollm2, how):
    eng = Engine(smollm2, stage_spec={**ATTN_REST, "timeout_s": 3}, **FAULT_KW)
    try:
        assert tokens(eng.generate(PROMPTS[:1], PARAMS, use_tqdm=False))
        pid = eng.runner.worker_pids()["attn"]
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        start = time.monotonic()
        outs = eng.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=50), use_tqdm=False)
        took = time.monotonic() - start
        assert all(o.finished and o.finish_reason == "error" for o in outs), [o.finish_reason for o in outs]
        word = "died" if how == "kill" else "hung"
        assert all(word in o.error and "'attn'" in o.error for o in outs), outs[0].error
        assert took < (2 if how == "kill" else 8)
        # later requests fail at once instead of hanging
        o = eng.generate(PROMPTS[2], PARAMS, use_tqdm=False)[0]
        assert o.finish_reason == "error" and word in o.error
    finally:
        check_clean_shutdown(eng)


def test_planner_spec_runs_as_is(smollm2, reference, tmp_path):
    """`python -m opdisagg_rt.analyze plan ... --out spec.yaml` -> Engine(stage_spec=spec.yaml). The best
    plan for this pool is one stage, which runs in the engine process: nothing extra over colocated."""
    from opdisagg_rt.analyze import main as analyze
    out = tmp_path / "spec.yaml"
    analyze(["plan", "--model", "smollm2-135m", "--pool", "h20:1,l20:1", "--objective", "throughput",
             "--phase", "decode", "--batch", "8", "--context", "256", "--out", str(out)])
    eng = Engine(smollm2, stage_spec=str(out), **KW)
    try:
        assert len(eng.runner.spec.stages) > 1 or (eng.runner.inline and not eng.runner.procs)
        assert tokens(run(eng)) == reference
    finally:
        eng.shutdown()


def test_streams_abort_in_flight(smollm2, reference):
    """Abort while the request's step is on the stages: its blocks are freed only after that step,
    so the other stream's outputs stay exact."""
    eng = Engine(smollm2, stage_spec={**ATTN_REST, "micro_batches": 2, "streams": True}, **dict(KW, kv_cache_memory=32 * 737280))
    try:
        a = eng.add_request(PROMPTS[0], PARAMS)
        b = eng.add_request(PROMPTS[1], PARAMS)
        eng.step()  # both streams submitted, one completed
        assert eng.abort(a)
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                done[o.request_id] = o
        assert done[b].token_ids == reference[1] and done[b].error is None
        assert eng.generate(PROMPTS[2], PARAMS, use_tqdm=False)[0].token_ids == reference[2]
    finally:
        eng.shutdown()
