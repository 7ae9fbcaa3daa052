"""Sampling on the stage that owns lm_head: the engine's Sampler runs there with each row's
parameters, so greedy and seeded outputs are token-identical to the colocated engine (float32),
and the logits never travel back to the engine."""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.disagg.sampling import SampleEncoder, StageSampler, merge_outputs
from opdisagg_rt.engine import Engine
from opdisagg_rt.sampling import Presampled, Sampler, SamplingParams, make_generator
from opdisagg_rt.scheduler.request import Request, RequestStatus
from tests.disagg.conftest import ATTN_REST

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "List three colors:", "Water boils at", "My favourite food is"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = [SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True),
          SamplingParams(temperature=1.0, top_k=20, min_p=0.02, seed=5, max_tokens=10, ignore_eos=True, logprobs=3),
          SamplingParams(temperature=0.8, seed=7, repetition_penalty=1.3, presence_penalty=0.4,
                         frequency_penalty=0.3, max_tokens=10, min_tokens=6)]
KW = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=64, num_threads=1, kv_cache_memory=12 * 737280)


class _Sched:
    def __init__(self, req, samples=True):
        self.request, self.samples = req, samples


def _req(rid, params, out=(), prompt=(5, 6, 7)):
    r = Request(rid, list(prompt), params, generator=make_generator(params.seed) if params.seed is not None else None)
    r.output_token_ids = list(out)
    return r


def test_stage_sampler_matches_the_engine_sampler_step_after_step():
    """Encoder (engine side) -> StageSampler (stage side) gives what Sampler gives the engine,
    seeded generators continuing across steps, penalties and min_tokens from the sent ids."""
    torch.manual_seed(0)
    params = [GREEDY, *SEEDED, SamplingParams(temperature=0.7, max_tokens=10)]
    reqs = [_req(str(i), p, out=[9, 9, 3][:i % 4]) for i, p in enumerate(params)]
    enc, stage, engine = SampleEncoder(), StageSampler(0, [2], {}), Sampler(0)
    for step in range(4):
        logits = torch.randn(len(reqs), 300)
        info, extra = enc.encode([_Sched(r) for r in reqs] + [_Sched(_req("x", GREEDY), samples=False)])
        got = stage.sample(logits, info, extra[0] if extra else None)
        want = engine.sample(logits, [r.sampling_params for r in reqs], [r.prompt_token_ids for r in reqs],
                             [r.output_token_ids for r in reqs], [r.generator for r in reqs], [2])
        assert got["tok"] == want.token_ids, step
        assert got["lp"] == want.logprobs
        for r, t in zip(reqs, got["tok"]):
            r.output_token_ids.append(t)


def test_finished_requests_release_their_generator():
    enc, gens = SampleEncoder(), {}
    stage = StageSampler(0, [], gens)
    a = _req("a", SEEDED[0])
    info, _ = enc.encode([_Sched(a)])
    stage.sample(torch.randn(1, 50), info, None)
    assert len(gens) == 1
    a.status = RequestStatus.FINISHED_LENGTH
    b = _req("a", SEEDED[0])  # the same id again, a new request: a fresh generator
    info, _ = enc.encode([_Sched(b)])
    assert info["drop"] == [0] and info["g"] == [1]
    stage.sample(torch.randn(1, 50), info, None)
    assert list(gens) == [1]


def test_merge_outputs_keeps_row_order_and_logprob_rows():
    out = merge_outputs([{"tok": [1, 2], "lp": None}, {"tok": [3], "lp": [[[3, -0.5]]]}])
    assert out.token_ids == [1, 2, 3] and out.logprobs == [None, None, [[3, -0.5]]]
    assert Sampler(0).sample(Presampled(out), [GREEDY] * 3) is out


def _run(engine, params):
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return outs


@pytest.fixture(scope="module")
def colocated(smollm2):
    eng = Engine(smollm2, **KW)
    params = [GREEDY, *SEEDED, GREEDY, SEEDED[0]]
    return params, _run(eng, params)


@pytest.mark.parametrize("name,spec", [
    ("attn_rest_streams2", {**ATTN_REST, "micro_batches": 2, "streams": True}),
    ("pipeline_mb2", {"stages": {
        "pp0": {"device": "cpu", "threads": 1, "ops": ["embed"] + [f"layers.{i}.*" for i in range(15)]},
        "pp1": {"device": "cpu", "threads": 1, "ops": [f"layers.{i}.*" for i in range(15, 30)] + ["final_norm", "lm_head"]}},
        "micro_batches": 2})])
def test_greedy_and_seeded_tokens_identical_to_colocated(smollm2, colocated, name, spec):
    params, ref = colocated
    eng = Engine(smollm2, stage_spec=spec, **KW)
    try:
        assert eng.runner.sample_on_stage
        outs = _run(eng, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        for o, r in zip(outs, ref):  # logprobs: same tokens, values within float32 batching noise
            assert (o.logprobs is None) == (r.logprobs is None)
            for a, b in zip(o.logprobs or [], r.logprobs or []):
                assert list(a) == list(b)
                assert all(abs(a[k] - b[k]) < 1e-3 for k in a)
        per = eng.runner.stats()["per_step"]
        assert per["logits_bytes"] == 0 and 0 < per["token_bytes"] < 1000  # no logits cross
    finally:
        eng.shutdown()
