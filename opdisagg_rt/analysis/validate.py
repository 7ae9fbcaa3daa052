"""Measured vs predicted time of every operation of SmolLM2-135M and a tiny hybrid on this CPU.

Each grid point runs whole forward passes with the reference torch ops (runner.py); an entry is
one operation role of one layer kind (e.g. `layers.*.attn [gdn]`) summed over its layers, or a
model-level op (embed, final_norm, lm_head). Error = (predicted - measured) / measured. Each op's
measured time is reference.speed_time over its repetitions in several sweeps of the grid (the
median of time / speed-probe time, times the probe's undisturbed time in this run), as in calibration.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from opdisagg_rt.analysis.hardware import CPU_PROFILE, cpu_device
from opdisagg_rt.analysis.models import load_model, parse_hf_config
from opdisagg_rt.analysis.ops import model_ops
from opdisagg_rt.analysis.runner import time_forwards
from opdisagg_rt.analysis.workload import Workload

# sliding window + Gated DeltaNet + full attention, MoE with a shared expert; weights (~0.5 GB)
# exceed the L3 like any real model, so they stream from DRAM as they would in serving
TINY_HYBRID = dict(model_type="tiny_hybrid", vocab_size=32000, hidden_size=768, num_hidden_layers=8,
                   num_attention_heads=12, num_key_value_heads=4, head_dim=64, sliding_window=256,
                   layer_types=["sliding_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
                   linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                   linear_value_head_dim=64, linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=2,
                   moe_intermediate_size=768, shared_expert_intermediate_size=768)


def grid(quick: bool) -> list[Workload]:
    if quick:
        return [Workload("decode", 2, [(256, 1)]), Workload("prefill", 1, [(64, 1)])]
    return ([Workload("decode", b, [(c, 1)]) for b in (1, 4, 16) for c in (128, 1024)] +
            [Workload("prefill", 1, [(n, 1)]) for n in (64, 256)] + [Workload("prefill", 4, [(128, 1)])])


def _key(op: str, spec) -> str:
    if not op.startswith("layers."):
        return op
    i, role = op.split(".", 2)[1:]
    return f"layers.*.{role} [{spec.layers[int(i)].attn}]"


def validate(profile: str | Path | None = None, quick: bool = False, dtype: str = "bf16", verbose: bool = True,
             threads: int = 1, passes: int = 5) -> dict:
    path = Path(profile) if profile else CPU_PROFILE
    if not path.exists():
        raise FileNotFoundError(f"no CPU profile at {path}: run `python -m opdisagg_rt.analyze calibrate` first")
    dev = cpu_device(path)
    models = {"smollm2-135m": load_model("smollm2-135m"), "tiny-hybrid": parse_hf_config(TINY_HYBRID, "tiny-hybrid")}
    load0 = os.getloadavg()[0]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # the profile's thread count
    rows = []
    runs = [(mname, spec, w) for mname, spec in models.items() for w in grid(quick)]
    try:
        # the grid is swept in several passes with the speed probe around every forward; an op's time
        # is its median time / probe ratio times the probe's undisturbed time in this run
        # (reference.speed_time), as in calibration
        tm = time_forwards(models, grid(quick), dtype, 1 if quick else passes, 2, "validation ", verbose)
    finally:
        torch.set_num_threads(prev)
    cal_ref = dev.profile.meta.get("probe_us", 0) * 1e-6 or None
    for i, (mname, spec, w) in enumerate(runs):
        agg: dict[str, list] = {}
        for o in model_ops(spec, w, 2 if dtype == "bf16" else 4):
            a = agg.setdefault(_key(o.op, spec), [0.0, 0.0, o.kind, 0.0])
            a[0] += tm.time(i, o.op)
            a[1] += dev.op_time(o, dtype)[0]
            a[3] += tm.time(i, o.op, cal_ref)
        for op, (m, p, kind, m_cal) in agg.items():
            rows.append({"model": mname, "phase": w.phase, "batch": w.batch, "context": w.context[0][0],
                         "op": op, "kind": kind, "measured_us": m * 1e6, "predicted_us": p * 1e6,
                         "err_pct": 100 * (p - m) / m, "measured_at_calibration_speed_us": m_cal * 1e6})
    errs = np.abs([r["err_pct"] for r in rows])

    def stats(key: str) -> dict:
        e = np.abs([100 * (r["predicted_us"] - r[key]) / r[key] for r in rows])
        return {"median_abs_err_pct": float(np.median(e)), "p90_abs_err_pct": float(np.percentile(e, 90))}
    return {"median_abs_err_pct": float(np.median(errs)), "p90_abs_err_pct": float(np.percentile(errs, 90)),
            "n": len(rows), "profile": str(path), "threads": threads, "dtype": dtype, "passes": 1 if quick else passes,
            "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
            # diagnostics: the machine's undisturbed speed now vs at calibration (the probe's time ratio,
            # > 1: slower now), and the errors with the measured times quoted at the calibration's speed
            "speed_vs_calibration": tm.probe.ref / cal_ref if cal_ref else None,
            "at_calibration_speed": stats("measured_at_calibration_speed_us") if cal_ref else None, "ops": rows}


def format_report(rep: dict) -> str:
    lines = [f"{'model':13s} {'phase':7s} {'b':>3s} {'ctx':>5s} {'op':32s} {'measured us':>12s} {'predicted us':>12s} {'err %':>7s}"]
    for r in rep["ops"]:
        lines.append(f"{r['model']:13s} {r['phase']:7s} {r['batch']:>3d} {r['context']:>5d} {r['op']:32s} "
                     f"{r['measured_us']:12.1f} {r['predicted_us']:12.1f} {r['err_pct']:7.1f}")
    lines.append(f"load average before/after: {rep['loadavg_before_after']} (2 cores; other processes skew CPU timings)")
    if rep.get("speed_vs_calibration"):
        c = rep["at_calibration_speed"]
        lines.append(f"machine speed vs calibration: probe {rep['speed_vs_calibration']:.2f}x the calibration's time; "
                     f"at the calibration's speed: median |error| {c['median_abs_err_pct']:.1f}%, p90 {c['p90_abs_err_pct']:.1f}%")
    lines.append(f"{rep['n']} entries: median |error| {rep['median_abs_err_pct']:.1f}% (bar 15%), "
                 f"p90 {rep['p90_abs_err_pct']:.1f}% (bar 35%)")
    return "\n".join(lines)
