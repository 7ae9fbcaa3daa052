"""`python -m opdisagg_rt.bench`: throughput and latency of the engine against a peer run in
the same process on the same prompts and weights."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.tensor(values, dtype=torch.float64).quantile(q / 100))


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (as vLLM's random dataset): the same prompts for every system."""
    g = torch.Generator().manual_seed(seed)
    # Skip the low ids, where tokenizers keep their special tokens (a tiny test vocab: its first quarter).
    return torch.randint(min(1000, vocab // 4), vocab, (num, length), generator=g).tolist()


def run_engine(engine, prompts: list[list[int]], output_len: int) -> dict:
    from opdisagg_rt.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.generate([p[:8] for p in prompts[:2]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.token_ids) for o in outs)
    ttft = [o.metrics.ttft * 1e3 for o in outs]
    tpot = [o.metrics.tpot * 1e3 for o in outs if o.metrics.tpot is not None]
    return {
        "throughput_tok_s": n_out / elapsed,
        "total_tok_s": (n_out + sum(len(p) for p in prompts)) / elapsed,
        "elapsed_s": elapsed, "output_tokens": n_out,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p99": percentile(tpot, 99),
        "prefix_cache_hit_tokens": sum(o.metrics.num_cached_tokens for o in outs),
    }


def hf_model(loaded, dtype: torch.dtype):
    from opdisagg_rt.models.hf_reference import hf_model_from_loaded
    return hf_model_from_loaded(loaded, dtype)


def run_hf(model, prompts: list[list[int]], output_len: int) -> dict:
    """HF transformers `generate` on the same weights: the whole batch at once (its best case)."""
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids[:2, :8], attention_mask=torch.ones_like(ids[:2, :8]), max_new_tokens=4, **kw)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, **kw)
        elapsed = time.perf_counter() - start
    n_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"throughput_tok_s": n_out / elapsed, "elapsed_s": elapsed, "output_tokens": n_out}


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput (its latencies with it), plus every run's throughput."""
    ranked = sorted(runs, key=lambda r: r["throughput_tok_s"])
    return ranked[(len(ranked) - 1) // 2] | {"throughput_tok_s_runs": [r["throughput_tok_s"] for r in runs]}


def profile_decode_step(engine, batch_size: int, context: int) -> dict[str, float]:
    """Milliseconds per operation kind in one decode step of `batch_size` sequences."""
    from opdisagg_rt.models.executor import profile_ops
    from opdisagg_rt.sampling import SamplingParams
    from opdisagg_rt.scheduler.request import Request
    from opdisagg_rt.scheduler.scheduler import ScheduledRequest
    reqs = [Request(f"profile-{i}", [1000 + i] * context, SamplingParams(temperature=0)) for i in range(batch_size)]
    for r in reqs:
        r.num_computed_tokens = context - 1
        if not engine.kv.allocate_slots(r, context):
            raise RuntimeError("KV cache too small for the profile batch")
    try:
        batch = engine.runner.prepare([ScheduledRequest(r, 1, engine.kv.block_table(r.request_id)) for r in reqs])
        with torch.inference_mode():
            profile_ops(engine.runner.ops, batch)
            runs = [profile_ops(engine.runner.ops, batch) for _ in range(5)]
    finally:
        for r in reqs:
            engine.kv.free(r)
    return {k: 1e3 * sorted(run[k] for run in runs)[2] for k in runs[0]}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["opdisagg_rt"] + list(result["peers"])
    values = [result["engine"]["throughput_tok_s"]] + [p["throughput_tok_s"] for p in result["peers"].values()]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, values, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    systems = [result["engine"]] + list(result["peers"].values())
    for i, r in enumerate(systems):  # every run of a repeated bench; the bar is the median
        runs = r.get("throughput_tok_s_runs", [])
        if len(runs) > 1:
            ax.plot([i] * len(runs), runs, "k.", label="runs (bar: median)" if i == 0 else None)
    if any(len(r.get("throughput_tok_s_runs", [])) > 1 for r in systems):
        ax.legend(loc="upper right", fontsize=8)
    w = result["workload"]
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{w['num_requests']} req x {w['input_len']} in / {w['output_len']} out, {w['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--layer-sweep" in argv:  # one layer of each attention type against context length
        from opdisagg_rt import bench_layers
        argv.remove("--layer-sweep")
        return bench_layers.main(argv, prog="python -m opdisagg_rt.bench --layer-sweep")
    ap = argparse.ArgumentParser(prog="python -m opdisagg_rt.bench", description=__doc__)
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: embedded SmolLM2)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=None, help="default 128 (16 for docqa/multiround)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--compare", action="append", default=[], choices=["hf", "no-store", "colocated"],
                    help="peer to run in the same process (no-store: the kv-store workloads without a store)")
    ap.add_argument("--stage-spec", default=None, help="disagg: run the engine on the stages of this spec (YAML/JSON); "
                    "--compare colocated adds the one-process engine as peers.colocated")
    ap.add_argument("--cost-profile", default=None, help="disagg: calibrated CPU profile for the predicted ratio "
                    "(default: the package's analysis/data/cpu_profile.json)")
    ap.add_argument("--profile", action="store_true", help="also time each operation of one decode step")
    ap.add_argument("--repeats", type=int, default=1, help="run the engine and its --compare peers (hf, colocated) "
                    "this many times, alternating, each round on fresh prompts, and report each one's median run")
    ap.add_argument("--layer-sweep", action="store_true", help="time one layer of each attention type against "
                    "context length instead (options: python -m opdisagg_rt.bench --layer-sweep --help)")
    ap.add_argument("--json", dest="json_path", help="write results as JSON here")
    ap.add_argument("--plot", help="write a PNG chart here")
    # -- kvstore workloads (opdisagg_rt/bench_workloads.py) --
    ap.add_argument("--workload", default="random", choices=["random", "docqa", "multiround"])
    ap.add_argument("--kv-store", action="append", default=[], help="cpu | disk:DIR | redis://[:pw@]host:port/db "
                    "| a comma-separated stack; repeat the flag to compare several stores in one run")
    ap.add_argument("--kv-store-size", type=int, default=None, help="bytes of the cpu (and disk) tier")
    ap.add_argument("--kv-store-chunk-size", type=int, default=256)
    ap.add_argument("--kv-cache-bytes", type=int, default=256 << 20, help="engine KV cache (kv-store workloads)")
    ap.add_argument("--num-docs", type=int, default=8)
    ap.add_argument("--doc-len", type=int, default=2048)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--turn-len", type=int, default=64)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.workload != "random":
        return _kvstore_main(args)
    if args.output_len is None:
        args.output_len = 128

    from opdisagg_rt.engine import Engine
    from opdisagg_rt.models.loader import load_model
    loaded = load_model(args.model)
    prompts = random_prompts(args.num_requests, args.input_len, loaded.config.vocab_size)
    engine = Engine(loaded, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, stage_spec=args.stage_spec)
    result = {"workload": {"num_requests": args.num_requests, "input_len": args.input_len,
                           "output_len": args.output_len, "dtype": args.dtype, "model": loaded.source,
                           "threads": torch.get_num_threads(), "repeats": args.repeats}, "peers": {}}
    # The engine and its peers alternate (engine, peers, engine, peers, ...) when repeated: a slow
    # spell of the machine then lands on every side of a ratio instead of on one. An idle peer
    # costs the running one nothing (stage workers block on their rings; no engine thread polls).
    peers: dict[str, Callable[[list[list[int]]], dict]] = {}
    if "colocated" in args.compare and args.stage_spec:
        colo = Engine(loaded, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens)
        peers["colocated"] = lambda ps: run_engine(colo, ps, args.output_len)
    if "hf" in args.compare:
        hf = hf_model(loaded, getattr(torch, args.dtype))
        peers["hf"] = lambda ps: run_hf(hf, ps, args.output_len)
    runs: dict[str, list[dict]] = {"engine": []} | {name: [] for name in peers}
    for i in range(args.repeats):
        # fresh prompts each round (the same for every system): no prefix-cache hits on a repeat
        round_prompts = prompts if i == 0 else random_prompts(args.num_requests, args.input_len,
                                                              loaded.config.vocab_size, seed=i)
        runs["engine"].append(run_engine(engine, round_prompts, args.output_len))
        end = time.perf_counter()
        last_run = (end - runs["engine"][-1]["elapsed_s"], end)  # the engine's last run, as perf_counter
        for name, run in peers.items():
            runs[name].append(run(round_prompts))
    result["engine"] = median_run(runs["engine"])
    for name in peers:
        result["peers"][name] = median_run(runs[name])
        result[f"ratio_vs_{name}"] = result["engine"]["throughput_tok_s"] / result["peers"][name]["throughput_tok_s"]
        if args.repeats > 1:  # each round's engine run against the peer's run right after it
            result[f"ratio_vs_{name}_per_round"] = [e["throughput_tok_s"] / p["throughput_tok_s"]
                                                    for e, p in zip(runs["engine"], runs[name])]
    if args.repeats > 1:
        result["runs"] = runs
    if args.profile:
        result["decode_step_profile_ms"] = profile_decode_step(
            engine, args.num_requests, args.input_len + args.output_len // 2)
    if args.stage_spec:  # --- disagg (issue 6) ---
        import os
        result["workload"]["stage_spec"] = args.stage_spec
        st = engine.runner.stats(trace=True)
        from opdisagg_rt.disagg.plots import plot_timeline, trace_utilization
        if args.plot:
            plot_timeline(st, args.plot.removesuffix(".png") + "_timeline.png", window=last_run)
        result["disagg"] = {k: v for k, v in st.items() if k in ("per_step", "memory")}
        result["disagg"]["busy_s"] = {k: v["busy_s"] for k, v in st["stages"].items()}  # over all runs
        result["disagg"]["busy_fraction_last_run"] = trace_utilization(st, last_run)
        if "engine_turnaround_ms" in st:
            result["disagg"]["engine_turnaround_ms"] = st["engine_turnaround_ms"]
        print("stage busy fraction (last run):", {k: round(v, 2) for k, v in result["disagg"]["busy_fraction_last_run"].items()},
              "engine turnaround per stream step: %.2f ms" % st.get("engine_turnaround_ms", float("nan")))
        engine.shutdown()
        result["disagg"]["loadavg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
        # what the analysis framework predicts for this spec on this machine's calibrated profile
        from opdisagg_rt.analysis.pipeline import BenchWorkload, format_prediction, model_spec_from_config, predict
        try:
            pred = predict(args.stage_spec, model_spec_from_config(loaded.config, loaded.source),
                           BenchWorkload(args.num_requests, args.input_len, args.output_len, args.max_num_seqs,
                                         args.max_num_batched_tokens), profile=args.cost_profile,
                           dtype="bf16" if args.dtype == "bfloat16" else "fp32")
        except (FileNotFoundError, ValueError) as e:
            print(f"no prediction: {e}")
        else:
            if "ratio_vs_colocated" in result:
                pred["measured_ratio"] = result["ratio_vs_colocated"]
                pred["error_pct"] = 100 * (result["ratio_vs_colocated"] - pred["ratio_vs_colocated"]) / pred["ratio_vs_colocated"]
            result["prediction"] = pred
            print(format_prediction(pred))
            if "measured_ratio" in pred:
                print(f"  measured ratio {pred['measured_ratio']:.2f}x ({pred['error_pct']:+.0f}% vs predicted)")
        # --- end disagg ---
    print_table(result)
    save_results(result, args.json_path, args.plot, plot)
    return result


def _kvstore_main(args) -> dict:
    from opdisagg_rt import bench_workloads
    from opdisagg_rt.models.loader import load_model
    if args.output_len is None:
        args.output_len = 16
    result = bench_workloads.run(args, load_model(args.model))
    bench_workloads.print_table(result)
    save_results(result, args.json_path, args.plot, bench_workloads.plot)
    return result


def save_results(result: dict, json_path: str | None, plot_path: str | None,
                 plot_fn: Callable[[dict, str], None]) -> None:
    """What every bench mode writes: the results as JSON and their chart as PNG, when asked."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    if plot_path:
        plot_fn(result, plot_path)


def print_table(result: dict) -> None:
    e = result["engine"]
    rows = [("opdisagg_rt", e["throughput_tok_s"], e["ttft_ms_p50"], e["ttft_ms_p99"], e["tpot_ms_p50"], e["tpot_ms_p99"])]
    rows += [(name, p["throughput_tok_s"], *[p.get(k, float("nan")) for k in
             ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")]) for name, p in result["peers"].items()]
    print(f"{'system':<14}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}  (ms)")
    for name, *vals in rows:
        print(f"{name:<14}" + "".join(f"{v:>10.1f}" if i else f"{v:>11.1f}" for i, v in enumerate(vals)))
    if len(e.get("throughput_tok_s_runs", ())) > 1:
        print("runs (out tok/s):", ", ".join(f"{name} " + " ".join(f"{v:.1f}" for v in p["throughput_tok_s_runs"])
                                             for name, p in [("opdisagg_rt", e), *result["peers"].items()]
                                             if "throughput_tok_s_runs" in p))
    for name, label in (("hf", "engine / HF"), ("colocated", "disaggregated / colocated")):
        if f"ratio_vs_{name}" in result:
            per_round = result.get(f"ratio_vs_{name}_per_round")
            print(f"{label} throughput: {result[f'ratio_vs_{name}']:.2f}x"
                  + (" (medians) | per round: " + " ".join(f"{r:.2f}x" for r in per_round) if per_round else ""))
    if "disagg" in result:
        print("bytes per step:", {k: round(v) for k, v in result["disagg"]["per_step"].items()})
    if "decode_step_profile_ms" in result:
        prof = result["decode_step_profile_ms"]
        total = sum(prof.values())
        print(f"one decode step: {total:.1f} ms")
        for k, v in sorted(prof.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<20}{v:8.2f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
