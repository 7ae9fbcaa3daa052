"""`python -m opdisagg_rt.bench --stage-spec SPEC --compare colocated`: the disaggregated engine
and its colocated peer alternate over --repeats rounds, each side reporting its median run."""
from __future__ import annotations

import pytest
import yaml


def test_bench_stage_spec_against_colocated_repeats(tiny_llama_dir, tmp_path, capsys):
    from opdisagg_rt import bench
    spec = tmp_path / "two_stages.yaml"
    spec.write_text(yaml.safe_dump({"stages": {
        "s0": {"device": "cpu", "threads": 1, "ops": ["embed", "layers.0.*"]},
        "s1": {"device": "cpu", "threads": 1, "ops": ["layers.1.*", "final_norm", "lm_head"]}},
        "micro_batches": 2, "streams": True}))
    out = tmp_path / "r.json"
    r = bench.main(["--model", tiny_llama_dir, "--num-requests", "4", "--input-len", "20", "--output-len", "4",
                    "--dtype", "float32", "--stage-spec", str(spec), "--compare", "colocated", "--repeats", "2",
                    "--json", str(out)])
    for side in (r["engine"], r["peers"]["colocated"]):
        assert side["output_tokens"] == 4 * 4 and len(side["throughput_tok_s_runs"]) == 2
    assert [len(r["runs"][k]) for k in ("engine", "colocated")] == [2, 2]
    assert r["ratio_vs_colocated"] == r["engine"]["throughput_tok_s"] / r["peers"]["colocated"]["throughput_tok_s"]
    assert len(r["ratio_vs_colocated_per_round"]) == 2
    assert set(r["disagg"]["busy_s"]) == {"s0", "s1"} and out.exists()
    assert "disaggregated / colocated throughput" in capsys.readouterr().out
    assert all(0 < f <= 1 for f in r["disagg"]["busy_fraction_last_run"].values())
    assert set(r["disagg"]["busy_fraction_last_run"]) == {"s0", "s1"}


def test_busy_fraction_of_the_last_run_leaves_out_the_time_between_runs():
    from opdisagg_rt.disagg.plots import trace_utilization
    # two runs of one stage, busy throughout each, 10 s apart (a colocated peer ran in between)
    stats = {"stages": {"s0": {"trace": [[0.0, 1.0, 0, 0], [1.0, 2.0, 1, 0], [12.0, 13.0, 0, 0], [13.0, 14.0, 1, 0]]}}}
    assert trace_utilization(stats, (12.0, 14.0)) == {"s0": 1.0}
    assert trace_utilization(stats)["s0"] < 0.3  # the traced span counts the gap as idle
    # a run longer than the trace (which kept its last units only): only its traced part counts
    tail = {"stages": {"s0": {"trace": stats["stages"]["s0"]["trace"][2:]}}}
    assert trace_utilization(tail, (5.0, 14.0)) == {"s0": 1.0}
    assert trace_utilization(stats, (12.0, 16.0)) == {"s0": 0.5}  # idle after the last unit


def test_timeline_window_lies_where_every_trace_covers_the_run():
    from opdisagg_rt.disagg.plots import timeline_window
    # a 10 s run whose traces kept only their last 2 s (a many-visit spec fills them fast)
    traces = {"s0": [[8.0 + 0.1 * i, 8.05 + 0.1 * i, i % 2, 0] for i in range(20)],
              "s1": [[8.5 + 0.1 * i, 8.55 + 0.1 * i, i % 2, 1] for i in range(15)]}
    start, end = timeline_window(traces, 1.0, (0.0, 10.0))
    # the middle of the covered part (8.5-10 s), not of the run (4.5-5.5 s), which no trace covers
    assert (start, end) == pytest.approx((8.75, 9.75))
    for tr in traces.values():
        assert any(start <= u[0] <= end for u in tr)
    # traces covering the whole run: its middle
    full = {"s0": [[0.1 * i, 0.1 * i + 0.05, 0, 0] for i in range(100)]}
    assert timeline_window(full, 1.0, (0.0, 10.0)) == pytest.approx((4.5, 5.5))
