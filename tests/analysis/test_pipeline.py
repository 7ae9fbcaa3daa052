"""The pipeline prediction's arithmetic (analysis/pipeline.py): schedules, crossings, thread
scaling, and the ratio against the colocated engine in cases whose answer is known."""
import json

import pytest

from opdisagg_rt.analysis.hardware import CPU_PROFILE, Device, Link
from opdisagg_rt.analysis.models import load_model, parse_hf_config
from opdisagg_rt.analysis.pipeline import (BenchWorkload, StepPlan, Unit, crossings, predict, simulate_step,
                                           simulate_streams, thread_speedup, visits)
from opdisagg_rt.analyze import main

# compute-bound toy device: every op's time is its FLOPs / 1 TFLOP/s (linear in the rows, no
# overheads, free memory traffic), so half a batch costs exactly half
TOY = Device("toy", {"bf16": 1.0}, 1000.0, 1e6, compute_eff=1.0, memory_eff=1.0, compute_half_us=0.0,
             memory_half_us=0.0, overhead_us=0.0)
FREE = Link("free", 1e9, 0.0)
NO_HOST = {"step_us": 0.0, "row_us": 0.0, "sample_row_us": 0.0, "sample_step_us": 0.0}
TINY = parse_hf_config({"model_type": "llama", "vocab_size": 8, "hidden_size": 256, "intermediate_size": 1024,
                        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                        "tie_word_embeddings": True}, "tiny")
WL = BenchWorkload(num_requests=16, input_len=32, output_len=64)


def _pp(split: int, streams: bool = True, mb: int = 2) -> dict:
    front = ["embed"] + [f"layers.{i}.*" for i in range(split)]
    back = [f"layers.{i}.*" for i in range(split, 4)] + ["final_norm", "lm_head"]
    return {"stages": {"pp0": {"device": "cpu", "threads": 1, "ops": front},
                       "pp1": {"device": "cpu", "threads": 1, "ops": back}}, "micro_batches": mb, "streams": streams}


def _predict(spec, speedup=2.0, **kw):
    kw.setdefault("msg_cpu_us", 0.0)
    table = {2: {"gemm": speedup, "attn": speedup, "norm": speedup, "embed": speedup, "other": speedup}}
    return predict(spec, TINY, WL, profile=TOY, cores=2, link=FREE, host=NO_HOST, speedup=table, **kw)


def test_streams_schedule_two_balanced_stages():
    plan = StepPlan([Unit("a", 0, 1.0), Unit("b", 1, 1.0)], host=0.0, stage_busy={"a": 1.0, "b": 1.0})
    assert simulate_streams(plan, 2) == pytest.approx(2.0)  # both stages always busy
    assert simulate_streams(plan, 1) == pytest.approx(2.0)  # one stream: each stage idles half the time
    # the engine's time between a stream's steps is hidden by the other stream only if there is slack
    plan.host = 0.5
    assert simulate_streams(plan, 2) == pytest.approx(2.5)
    assert simulate_streams(plan, 3) == pytest.approx(3.0)  # a third stream covers it: stage-bound
    plan.host = 0.0  # two rounds from an idle pipeline: fill, 2 x 2 units on the last stage
    assert simulate_streams(plan, 2, rounds=2, makespan=True) == pytest.approx(5.0)


def test_streams_schedule_twice_the_work_halves_throughput():
    even = StepPlan([Unit("a", 0, 1.0), Unit("b", 1, 1.0)], host=0.0)
    heavy = StepPlan([Unit("a", 0, 2.0), Unit("b", 1, 1.0)], host=0.0)
    assert simulate_streams(heavy, 2) == pytest.approx(2 * simulate_streams(even, 2))


def test_within_step_micro_batches_fill_and_drain():
    plan = StepPlan([Unit("a", 0, 1.0, xfer=0.25), Unit("b", 1, 1.0)], host=0.5)
    # a: mb0 [0,1], mb1 [1,2]; b: mb0 [1.25,2.25], mb1 [2.25,3.25]; + the engine's 2 x 0.5
    assert simulate_step(plan, 2) == pytest.approx(3.25 + 1.0)
    # multi-visit (a, b, a): visit-major order on each stage
    plan = StepPlan([Unit("a", 0, 1.0), Unit("b", 1, 1.0), Unit("a", 2, 1.0)], host=0.0)
    assert simulate_step(plan, 2) == pytest.approx(4.0)


def test_crossings_follow_the_declared_tensors():
    m = load_model("smollm2-135m")
    names = m.op_names()
    attn_rest = {n: ("attn" if n.endswith(".attn") else "rest") for n in names}
    vis = visits(names, attn_rest)
    assert len(vis) == 61 and [v[0] for v in vis[:3]] == ["rest", "attn", "rest"]
    sends = crossings(m, vis, tokens=10, logit_rows=10, b=2, driver=True)
    out = [(vis[i][0], d, n) for i, s in enumerate(sends) for d, n in s]
    qkv = 10 * (576 + 2 * 192) * 2
    assert out.count(("rest", "attn", qkv)) == 30  # q, k, v to every attention visit
    assert out.count(("attn", "rest", 10 * 576 * 2)) == 30  # attn_out back; the residual never travels
    assert out[-1] == ("rest", "driver", 10 * 49152 * 4)
    pp = {n: ("pp0" if n == "embed" or (n.startswith("layers.") and int(n.split(".")[1]) < 15) else "pp1") for n in names}
    vis = visits(names, pp)
    sends = crossings(m, vis, tokens=10, logit_rows=10, b=2, driver=False)
    assert sends == [[("pp1", 10 * 576 * 2)], []]  # only the residual crosses, once


def _step_ratio(p):
    return p["colocated"]["decode_step_ms"] / p["disaggregated"]["decode_step_ms"]


def test_balanced_split_predicts_the_thread_scaling_ratio():
    # Each stage does half the work with one thread; the colocated engine does all of it with two
    # threads at speedup s: in steady state the ratio is 2 / s (1.0 for perfect scaling). The
    # prefill (2 rounds from an idle pipeline) fills and drains, so the whole run is a bit below.
    for s in (2.0, 1.6, 1.25):
        p = _predict(_pp(2), speedup=s)
        assert _step_ratio(p) == pytest.approx(2 / s, rel=0.03), (s, p)
        assert 0.75 * 2 / s < p["ratio_vs_colocated"] < 2 / s
        busy = [st["busy_ms_per_step"] for st in p["stages"].values()]
        assert busy[0] == pytest.approx(busy[1], rel=0.03)


def test_unbalanced_split_is_bound_by_the_heavier_stage():
    even, heavy = _predict(_pp(2)), _predict(_pp(3))  # 3 layers vs 1: the front stage has ~3/2 of the even share
    b_even = max(s["busy_ms_per_step"] for s in even["stages"].values())
    b_heavy = max(s["busy_ms_per_step"] for s in heavy["stages"].values())
    assert b_heavy == pytest.approx(1.5 * b_even, rel=0.03)
    assert heavy["disaggregated"]["decode_step_ms"] == pytest.approx(1.5 * even["disaggregated"]["decode_step_ms"],
                                                                     rel=0.03)
    assert heavy["ratio_vs_colocated"] < even["ratio_vs_colocated"]
    assert heavy["colocated"] == even["colocated"]


def test_engine_time_and_transfers_lower_the_prediction():
    base = _predict(_pp(2))
    host = predict(_pp(2), TINY, WL, profile=TOY, cores=2, link=FREE, msg_cpu_us=0.0,
                   host={**NO_HOST, "step_us": 2000.0}, speedup={2: {"other": 2.0, "gemm": 2.0, "attn": 2.0}})
    slow = predict(_pp(2), TINY, WL, profile=TOY, cores=2, link=Link("slow", 0.01, 500.0), host=NO_HOST, msg_cpu_us=0.0,
                   speedup={2: {"other": 2.0, "gemm": 2.0, "attn": 2.0}})
    assert host["disaggregated"]["throughput_tok_s"] < base["disaggregated"]["throughput_tok_s"]
    assert slow["disaggregated"]["throughput_tok_s"] < base["disaggregated"]["throughput_tok_s"]
    assert slow["colocated"]["throughput_tok_s"] == pytest.approx(base["colocated"]["throughput_tok_s"])


def test_within_step_micro_batches_drain_every_step():
    streams, steps = _predict(_pp(2, streams=True)), _predict(_pp(2, streams=False))
    # two balanced stages, two micro-batches per step: 3 unit-times per step instead of 2
    assert steps["disaggregated"]["decode_step_ms"] == pytest.approx(1.5 * streams["disaggregated"]["decode_step_ms"],
                                                                     rel=0.05)


def test_thread_speedup_table():
    table = {2: {"gemm": 1.8, "other": 1.2}}
    assert thread_speedup("gemm", 1, table) == 1.0
    assert thread_speedup("gemm", 2, table) == 1.8 and thread_speedup("attn", 2, table) == 1.2
    assert thread_speedup("gemm", 4, table) == pytest.approx(1 + 0.8 * 3)


@pytest.mark.skipif(not CPU_PROFILE.exists(), reason="no calibrated CPU profile")
def test_calibrated_profile_prediction_for_the_bench_specs(capsys):
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "bench" / "disagg"
    for name in ("attn_rest.yaml", "balanced_2stage.yaml"):
        p = predict(root / name)
        assert 0.05 < p["ratio_vs_colocated"] < 2.0
        assert set(p["stages"]) == set(json.loads(json.dumps(p))["stages"])
    ar = predict(root / "attn_rest.yaml")
    assert ar["stages"]["attn"]["visits"] == 30 and ar["stages"]["rest"]["visits"] == 31
    assert ar["transfers"]["per_micro_batch"] == 60
    assert main(["pipeline", "--spec", str(root / "attn_rest.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratio_vs_colocated"] == pytest.approx(ar["ratio_vs_colocated"])
