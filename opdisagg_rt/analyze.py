"""`python -m opdisagg_rt.analyze {ops,params,roofline,plan,calibrate,validate,pipeline}`: the analytical framework's CLI.

Every subcommand takes --json for machine-readable output (shapes documented in docs/analysis.md).
"""
from __future__ import annotations

import argparse
import json
import sys

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


def _workload(a):
    from opdisagg_rt.analysis.workload import Workload, parse_context
    return Workload(a.phase, a.batch, parse_context(a.context), a.prefix, a.chunk, a.moe_imbalance)


def _add_workload(p: argparse.ArgumentParser, batch: int = 1) -> None:
    p.add_argument("--model", required=True, help="preset name or path to an HF config.json")
    p.add_argument("--phase", default="decode", choices=["prefill", "decode", "mixed"])
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--context", default="2048", help="length, or a distribution 'len:weight,len:weight'")
    p.add_argument("--prefix", type=int, default=0, help="prefill: prefix-cached tokens per prompt")
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk size (0 = whole prompt)")
    p.add_argument("--moe-imbalance", type=float, default=1.0)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--hardware-file", default=None, help="YAML with extra devices/links")
    p.add_argument("--json", action="store_true")


def cmd_params(a) -> int:
    from opdisagg_rt.analysis.models import load_model
    from opdisagg_rt.analysis.ops import count_params
    c = count_params(load_model(a.model))
    if a.json:
        print(json.dumps(c))
    else:
        for k, v in c.items():
            print(f"{k:>22s}  {v / 1e9:10.3f} B  ({v:,})")
    return 0


def op_rows(model, workload, device, dtype: str) -> list[dict]:
    from opdisagg_rt.analysis.ops import model_ops
    rows = []
    for o in model_ops(model, workload, DTYPE_BYTES[dtype]):
        t, bound = device.op_time(o, dtype)
        rows.append({"op": o.op, "flops": o.flops, "bytes": o.bytes, "intensity": o.intensity,
                     "time_us": t * 1e6, "bound": bound})
    return rows


def cmd_ops(a) -> int:
    from opdisagg_rt.analysis.hardware import get_device
    from opdisagg_rt.analysis.models import load_model
    m, dev = load_model(a.model), get_device(a.hardware, a.hardware_file)
    rows = op_rows(m, _workload(a), dev, a.dtype)
    if a.json:
        print(json.dumps(rows))
        return 0
    if a.group:  # one line per (role, layer kind): the layers of a kind cost the same
        kinds = {f"layers.{i}.": l.attn for i, l in enumerate(m.layers)}
        agg: dict[str, dict] = {}
        for r in rows:
            key = r["op"]
            if key.startswith("layers."):
                i, role = key.split(".", 2)[1:]
                key = f"layers.*.{role} [{kinds[f'layers.{i}.']}]"
            g = agg.setdefault(key, {"op": key, "n": 0, "flops": 0, "bytes": 0, "time_us": 0, "bound": r["bound"]})
            g["n"] += 1
            for f in ("flops", "bytes", "time_us"):
                g[f] += r[f]
        rows = [{**g, "intensity": g["flops"] / g["bytes"] if g["bytes"] else 0} for g in agg.values()]
    print(f"{'op':40s} {'GFLOP':>11s} {'MB':>11s} {'FLOP/B':>8s} {'time us':>10s}  bound")
    for r in rows:
        print(f"{r['op']:40s} {r['flops'] / 1e9:11.3f} {r['bytes'] / 1e6:11.3f} {r['intensity']:8.1f} {r['time_us']:10.1f}  {r['bound']}")
    tot = sum(r["time_us"] for r in rows)
    print(f"total {tot / 1e3:.3f} ms per step on one {dev.name} (ridge {dev.ridge:.0f} FLOP/B)")
    return 0


def cmd_roofline(a) -> int:
    from opdisagg_rt.analysis.plots import roofline_chart
    info = roofline_chart(a.model, _workload(a), a.hardware.split(","), a.out, a.dtype, a.hardware_file)
    print(json.dumps(info) if a.json else f"wrote {a.out} ({len(info['points'])} points)")
    return 0


def cmd_plan(a) -> int:
    from opdisagg_rt.analysis.planner import format_plans, plan
    res = plan(a.model, _workload(a), a.pool, objective=a.objective, tpot_ms=a.tpot_ms, dtype=a.dtype,
               link=a.link, hardware_file=a.hardware_file, top=a.top)
    if a.out and res["plans"]:
        from opdisagg_rt.analysis.stagespec import dump_stage_spec
        dump_stage_spec(res["plans"][0]["spec"], a.out)
    for p in res["plans"]:
        p.pop("spec", None)
    print(json.dumps(res) if a.json else format_plans(res, a.out))
    return 0 if res["plans"] else 1


def cmd_calibrate(a) -> int:
    from opdisagg_rt.analysis.calibrate import calibrate
    prof = calibrate(out=a.out, quick=a.quick, verbose=not a.json)
    print(json.dumps(prof) if a.json else f"wrote {a.out or 'default profile'}")
    return 0


def cmd_validate(a) -> int:
    from opdisagg_rt.analysis.validate import format_report, validate
    rep = validate(profile=a.profile, quick=a.quick, dtype=a.dtype, verbose=not a.json)
    print(json.dumps(rep) if a.json else format_report(rep))
    return 0


def cmd_pipeline(a) -> int:
    from opdisagg_rt.analysis.pipeline import (BenchWorkload, format_prediction, measure_host,
                                               measure_thread_scaling, measure_transport_cpu, predict)
    if a.measure:
        out = {"thread_speedup": {str(a.threads): measure_thread_scaling(a.model, threads=a.threads)},
               "host_us": measure_host(), "msg_cpu_us": measure_transport_cpu()}
        print(json.dumps(out, indent=1))
        return 0
    if not a.spec:
        raise ValueError("--spec is required (or --measure)")
    p = predict(a.spec, a.model, BenchWorkload(a.num_requests, a.input_len, a.output_len, a.max_num_seqs,
                                               a.max_num_batched_tokens), profile=a.profile, dtype=a.dtype, cores=a.cores)
    print(json.dumps(p) if a.json else format_prediction(p))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opdisagg_rt.analyze", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="parameter counts of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_params)
    p = sub.add_parser("ops", help="per-operation FLOPs, bytes, intensity, time and bound on a device")
    _add_workload(p)
    p.add_argument("--hardware", default="h100_sxm")
    p.add_argument("--group", action="store_true", help="one line per operation role and layer kind")
    p.set_defaults(fn=cmd_ops)
    p = sub.add_parser("roofline", help="PNG roofline chart: each operation as a point per device")
    _add_workload(p)
    p.add_argument("--hardware", default="h100_sxm,h20", help="comma-separated devices")
    p.add_argument("--out", default="roofline.png")
    p.set_defaults(fn=cmd_roofline)
    p = sub.add_parser("plan", help="place operation groups on a device pool; write the best stage spec")
    _add_workload(p, batch=64)
    p.add_argument("--pool", default="h100_sxm:2,h20:4", help="device:count,...")
    p.add_argument("--link", default=None, help="link between device groups (default: the devices' scale_out)")
    p.add_argument("--objective", default="per_dollar", choices=["per_dollar", "throughput"])
    p.add_argument("--tpot-ms", type=float, default=None, help="time-per-output-token limit")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--out", default=None, help="write the best plan's stage spec (YAML)")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("calibrate", help="measure this CPU and fit its efficiency profile")
    p.add_argument("--out", default=None, help="profile path (default: the package's data/cpu_profile.json)")
    p.add_argument("--quick", action="store_true", help="small grid (tests)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_calibrate)
    p = sub.add_parser("validate", help="measure ops of SmolLM2 and a tiny hybrid on this CPU vs predictions")
    p.add_argument("--profile", default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("pipeline", help="predicted throughput of a stage spec vs the colocated engine on this CPU")
    p.add_argument("--spec", default=None, help="stage spec (YAML/JSON) as the runtime reads it")
    p.add_argument("--model", default="smollm2-135m", help="preset name or path to an HF config.json")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--profile", default=None, help="calibrated CPU profile (default: the package's)")
    p.add_argument("--cores", type=int, default=None, help="cores shared by the stages and the engine (default: this machine's)")
    p.add_argument("--measure", action="store_true", help="measure the thread scaling and engine overheads it assumes")
    p.add_argument("--threads", type=int, default=2, help="--measure: thread count to compare with one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_pipeline)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
