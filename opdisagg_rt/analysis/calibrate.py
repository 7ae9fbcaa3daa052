"""Measure this CPU and fit the efficiency profile the cost model uses for device "cpu".

1. copy bandwidth vs working set (hot: activations) and from DRAM (cold: weights, KV, state);
2. an isolated GEMM sweep per dtype, weights cold (cycled through a pool larger than the L3):
   kept as measured, and the source of the bf16/fp32 ratios;
3. whole forward passes of calibration models (shapes unlike the validation models) with the
   reference ops, swept twice. Fitted on them by grid search on the mean absolute log error:
   GEMMs  t = o + max(2MKN / (R M / (M + M_half)), bytes / bw)   (rate grows with the rows M),
   kinds  t = o + max(F / (R F / (F + F_half)), cold_bytes / bw + act_bytes / (a hot_bw))
   for norm, embed, attention and linear attention (prefill and decode apart), and MoE's
   routing overhead (fixed + per touched expert).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opdisagg_rt.analysis import reference as Rf
from opdisagg_rt.analysis.hardware import CPU_PROFILE, CpuProfile
from opdisagg_rt.analysis.models import ModelSpec, parse_hf_config
from opdisagg_rt.analysis.ops import model_ops
from opdisagg_rt.analysis.runner import DTYPES, RefModel
from opdisagg_rt.analysis.workload import Workload

POOL_BYTES = 192 << 20  # > the 105 MiB L3 here, so cycling through the pool keeps weights cold
KINDS = ("norm", "embed", "attn", "linear_attn")

# calibration models: shapes deliberately unlike validate.py's (SmolLM2, tiny-hybrid)
CAL_MODELS = {
    "cal-dense": dict(model_type="cal", vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                      layer_types=["full_attention", "sliding_attention"] * 4, sliding_window=512),
    "cal-gdn-moe": dict(model_type="cal", vocab_size=16000, hidden_size=1024, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                        layer_types=["linear_attention", "linear_attention", "full_attention"] * 2,
                        linear_num_key_heads=8, linear_num_value_heads=8, linear_key_head_dim=96,
                        linear_value_head_dim=96, linear_conv_kernel_dim=4, num_experts=32,
                        num_experts_per_tok=4, moe_intermediate_size=512),
    "cal-lightning": dict(model_type="minimax_text_01", vocab_size=16000, hidden_size=1024,
                          intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=128, attn_type_list=[0, 0, 1] * 2),
}


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        with Rf.Timer() as t:
            fn()
        ts.append(t.total)
    return Rf.low_median(ts)


def measure_bandwidth(quick: bool) -> tuple[dict, float]:
    sizes = [12, 14, 16, 18, 20, 22, 24] if not quick else [12, 18, 24]
    gbps = []
    for lg in sizes:
        n = (1 << lg) // 4
        a, b = torch.ones(n), torch.empty(n)
        t = _time(lambda: b.copy_(a), 30 if lg < 22 else 8)
        gbps.append(2 * n * 4 / t / 1e9)  # read + write
    n = (256 << 20) // 4  # DRAM: 256 MiB each way, far beyond the L3
    a, b = torch.ones(n), torch.empty(n)
    dram = 2 * n * 4 / _time(lambda: b.copy_(a), 3 if quick else 5) / 1e9
    return {"log2_bytes": [float(s) for s in sizes], "gbps": gbps}, dram


def measure_gemm(dtype: str, quick: bool, verbose: bool) -> dict:
    dt = DTYPES[dtype]
    ms = [1, 16, 256]
    ks = [512, 2048] if quick else [512, 4096]
    ns = [256, 4096, 65536] if quick else [512, 8192]
    pool = torch.empty(POOL_BYTES * 8 // torch.finfo(dt).bits, dtype=dt).normal_(0, 0.02)
    cube = np.full((len(ms), len(ks), len(ns)), np.nan)
    cap = 3e9 if quick else 2e10
    for a, K in enumerate(ks):
        for b, N in enumerate(ns):
            if K * N > 1 << 26:
                continue  # > 128 MiB of bf16 weights: filled from the nearest measured N below
            copies = max(1, pool.numel() // (K * N))
            ws = [pool[c * K * N:(c + 1) * K * N].view(N, K) for c in range(copies)]
            for i, M in enumerate(ms):
                if 2.0 * M * K * N > cap:
                    continue
                x = torch.randn(M, K, dtype=dt)
                reps = int(min(11, max(5, 0.03 / max(2 * M * K * N / 2e11, 1e-5))))
                it = iter(range(10 ** 9))
                t = _time(lambda: F.linear(x, ws[next(it) % copies]), reps)
                cube[i, a, b] = math.log2(2 * M * K * N / t / 1e9)
            if verbose:
                print(f"  gemm {dtype} K={K:5d} N={N:5d}: " + " ".join(
                    f"{2 ** r:.0f}" for r in cube[:, a, b] if not np.isnan(r)) + " GFLOP/s over M=" + ",".join(map(str, ms)))
    # fill the holes: along M from measured neighbours (log-linear), then along N from below.
    # More rows never lower the rate of a GEMM (more reuse per weight byte), so dips and spikes
    # from timing noise are pooled away with an isotonic fit along M.
    lm = np.log2(ms)
    for a in range(len(ks)):
        for b in range(len(ns)):
            col = cube[:, a, b]
            ok = ~np.isnan(col)
            if ok.any():
                cube[:, a, b] = _isotonic(np.interp(lm, lm[ok], col[ok]))
        for b in range(1, len(ns)):
            if np.isnan(cube[0, a, b]):
                cube[:, a, b] = cube[:, a, b - 1]
    del pool
    return {"log2_m": lm.tolist(), "log2_k": np.log2(ks).tolist(), "log2_n": np.log2(ns).tolist(),
            "log2_gflops": cube.tolist()}


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit (pool adjacent violators)."""
    blocks = [[float(v), 1] for v in y]
    i = 0
    while i < len(blocks) - 1:
        if blocks[i][0] > blocks[i + 1][0]:
            (v1, n1), (v2, n2) = blocks[i], blocks[i + 1]
            blocks[i:i + 2] = [[(v1 * n1 + v2 * n2) / (n1 + n2), n1 + n2]]
            i = max(i - 1, 0)
        else:
            i += 1
    return np.concatenate([[v] * n for v, n in blocks])


def _workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload("decode", 4, [(256, 1)]), Workload("prefill", 1, [(128, 1)])]
    return ([Workload("decode", b, [(c, 1)]) for b in (1, 8, 32) for c in (256, 2048)] +
            [Workload("prefill", 1, [(n, 1)]) for n in (128, 512)] + [Workload("prefill", 4, [(192, 1)])])


def collect_samples(models: dict[str, ModelSpec], dtype: str, quick: bool, verbose: bool, passes: int = 2) -> list[dict]:
    """(op, kind, cost, measured) for every op of every calibration forward. The grid is swept
    `passes` times and each op keeps the low median over all passes' repetitions, so a burst of
    load from other processes during one pass does not set the profile."""
    runs = [(name, spec, w) for name, spec in models.items() for w in _workloads(quick)]
    times: dict[int, dict[str, list[float]]] = {i: {} for i in range(len(runs))}
    for p in range(passes):
        for i, (name, spec, w) in enumerate(runs):
            g = w.groups()[0]
            ref = RefModel(spec, dtype, int(g.count), g.past + g.new)
            t0 = time.time()
            with torch.inference_mode():
                ref.forward(w, {})  # warm-up
                for _ in range(2):
                    ref.forward(w, times[i])
            if verbose:
                print(f"  pass {p + 1}/{passes} {name} {w.phase} b={w.batch} ctx={w.context[0][0]}: {time.time() - t0:.1f}s")
            del ref
    out = []
    for i, (name, spec, w) in enumerate(runs):
        for o in model_ops(spec, w, 2 if dtype == "bf16" else 4):
            out.append({"op": o.op, "kind": o.kind, "cost": o, "t": Rf.low_median(times[i][o.op]), "model": name,
                        "workload": f"{w.phase} b={w.batch} ctx={w.context[0][0]}"})
    return out


def _fit_kind(samples: list[dict], prof: CpuProfile) -> dict[str, float]:
    """Grid search of (overhead, R, F_half, bw_cold, a) minimising mean |log(pred / measured)|."""
    t = np.array([s["t"] for s in samples])
    Fl = np.array([s["cost"].flops for s in samples])
    Bc = np.array([s["cost"].weight_bytes + s["cost"].state_bytes for s in samples])
    Ba = np.array([s["cost"].act_bytes for s in samples])
    hot = np.array([prof.hot_bw(b) for b in Ba])
    Rm = np.geomspace(0.3e9, 3e12, 18)[:, None, None, None, None]
    Fh = np.geomspace(1e3, 1e9, 10)[None, :, None, None, None]
    bw = (prof.dram_gbps * 1e9 * np.geomspace(0.1, 3, 10))[None, None, :, None, None]
    a = np.geomspace(0.03, 1.5, 10)[None, None, None, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = np.where(Fl > 0, Fl / (Rm * Fl / (Fl + Fh)), 0.0)
        tm = Bc / bw + Ba / (a * hot)
        body = np.maximum(tc, tm)
        best = (np.inf, None, 0.0)
        for o in np.geomspace(max(t.min() * 0.02, 1e-7), t.min() * 1.2, 16):
            err = np.abs(np.log((o + body) / t)).mean(-1)
            i = np.unravel_index(np.nanargmin(err), err.shape)
            if err[i] < best[0]:
                best = (float(err[i]), i, float(o))
    e, i, o = best
    return {"overhead_us": o * 1e6, "gflops_max": float(Rm.flat[i[0]] / 1e9), "half_mflop": float(Fh.flat[i[1]] / 1e6),
            "gbps": float(bw.flat[i[2]] / 1e9), "act_eff": float(a.flat[i[3]]), "fit_mean_abs_log_err": e}


def _fit_offset(t: np.ndarray, base: np.ndarray, per: np.ndarray | None = None) -> tuple[float, float]:
    """(o, p) minimising mean |log((o + p * per + base) / t)|: overheads a table or roofline leaves out."""
    per = np.zeros_like(t) if per is None else per
    o = np.concatenate([[0.0], np.geomspace(1e-6, 2e-3, 60)])[:, None, None]
    p = (np.concatenate([[0.0], np.geomspace(1e-6, 1e-3, 40)]) if per.any() else np.zeros(1))[None, :, None]
    err = np.abs(np.log((o + p * per + base) / t)).mean(-1)
    i, j = np.unravel_index(np.argmin(err), err.shape)
    return float(o.flat[i]), float(p.flat[j])


def _fit_gemm(samples: list[dict], prof: CpuProfile) -> dict[str, float]:
    """Grid search of (overhead, R_max, M_half, bw) on GEMM ops timed inside forwards."""
    t = np.array([s["t"] for s in samples])
    rows = [(s["cost"].gemms) for s in samples]
    G = max(len(r) for r in rows)
    M, K, N, C = (np.zeros((len(rows), G)) for _ in range(4))
    M += 1  # padding slots (ops with fewer GEMMs) get C = 0 and must not produce 0/0
    for i, r in enumerate(rows):
        for j, (m, k, n, c) in enumerate(r):
            M[i, j], K[i, j], N[i, j], C[i, j] = max(m, 1), k, n, c
    b = 2 if prof.meta.get("dtype", "bf16") == "bf16" else 4
    F, B = (2 * M * K * N).astype(np.float32), ((K * N + M * (K + N)) * b).astype(np.float32)
    M, C, t = M.astype(np.float32), C.astype(np.float32), t.astype(np.float32)
    best = (np.inf, None)
    Rs = np.geomspace(20e9, 3e12, 24, dtype=np.float32)[:, None, None, None, None]
    Mh = np.geomspace(0.5, 512, 20, dtype=np.float32)[None, :, None, None, None]
    bws = np.geomspace(1e9, 60e9, 20, dtype=np.float32)[None, None, :, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        body = np.maximum(F / (Rs * M / (M + Mh)), B / bws)  # [R, Mh, bw, sample, gemm]
        for o in np.concatenate([[0.0], np.geomspace(1e-6, 3e-4, 30)]):
            pred = ((o + body) * C).sum(-1)
            err = np.abs(np.log(pred / t)).mean(-1)
            i = np.unravel_index(np.argmin(err), err.shape)
            if err[i] < best[0]:
                best = (float(err[i]), (o, Rs.flat[i[0]], Mh.flat[i[1]], bws.flat[i[2]]))
    e, (o, R, mh, bw) = best
    return {"overhead_us": float(o) * 1e6, "gflops_max": float(R) / 1e9, "m_half": float(mh), "gbps": float(bw) / 1e9, "fit_mean_abs_log_err": e}


def fit_profile(samples: list[dict], prof: CpuProfile) -> CpuProfile:
    gem = [s for s in samples if s["kind"] == "gemm"]
    prof.gemm_fit = _fit_gemm(gem, prof)
    for kind in KINDS:
        for dec in (False, True):
            ks = [s for s in samples if s["kind"] == kind and s["cost"].decode == dec]
            if ks:
                prof.curves[kind + ("_decode" if dec else "")] = _fit_kind(ks, prof)
    prof.curves["moe"] = {"overhead_us": 0.0, "per_expert_us": 0.0}
    moe = [s for s in samples if s["kind"] == "moe"]
    if moe:  # routing + gather/scatter: a fixed part and a part per touched expert
        base = np.array([prof.op_time(s["cost"], "bf16")[0] for s in moe])
        touched = np.array([s["cost"].gemms[1][3] for s in moe])
        o, p = _fit_offset(np.array([s["t"] for s in moe]), base, touched)
        prof.curves["moe"] = {"overhead_us": o * 1e6, "per_expert_us": p * 1e6}
    # [model, workload, op, measured us, fitted us]: FLOPs and bytes follow from ops.model_ops
    prof.samples = [[s["model"], s["workload"], s["op"], s["t"] * 1e6, prof.op_time(s["cost"], "bf16")[0] * 1e6]
                    for s in samples]
    return prof


def calibrate(out: str | Path | None = None, quick: bool = False, verbose: bool = True, threads: int = 1,
              dtype: str = "bf16") -> dict:
    """Measure, fit, write the profile (default: the package's data/cpu_profile.json); return it."""
    load0 = os.getloadavg()[0]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # one intra-op thread: stable on a shared box, and per-stage threads are explicit
    t0 = time.time()
    try:
        with torch.inference_mode():
            hot, dram = measure_bandwidth(quick)
            if verbose:
                print(f"  DRAM copy {dram:.1f} GB/s; hot copy " + " ".join(f"{g:.0f}" for g in hot["gbps"]) + " GB/s")
            # both dtypes, small grid: the ratio scales the fitted GEMM curve for the other dtype
            gemm = {d: measure_gemm(d, quick, verbose) for d in dict.fromkeys((dtype, "fp32" if dtype == "bf16" else "bf16"))}
        prof = CpuProfile(gemm, {}, hot, dram, {}, {"dtype": dtype})
        models = {k: parse_hf_config(v, k) for k, v in CAL_MODELS.items()}
        if quick:
            models.pop("cal-lightning")
        samples = collect_samples(models, dtype, quick, verbose)
        prof = fit_profile(samples, prof)
    finally:
        torch.set_num_threads(prev)
    prof.meta = {**prof.meta, "threads": threads, "dtype": dtype, "quick": quick, "seconds": round(time.time() - t0, 1),
                 "cpu": _cpu_name(), "mem_gb": _mem_gb(), "torch": torch.__version__,
                 "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    d = prof.to_json()
    path = Path(out) if out else CPU_PROFILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_profile(d, path)
    return d


def write_profile(d: dict, path: Path) -> None:
    """Compact JSON: 4 significant digits, one raw sample per line."""
    def r(x):
        if isinstance(x, float):
            return float(f"{x:.4g}")
        if isinstance(x, dict):
            return {k: r(v) for k, v in x.items()}
        if isinstance(x, list):
            return [r(v) for v in x]
        return x
    d = r(d)
    head = json.dumps({k: v for k, v in d.items() if k != "samples"}, indent=1)[:-2]
    rows = ",\n  ".join(json.dumps(s) for s in d.get("samples", []))
    path.write_text(f'{head},\n "samples": [\n  {rows}\n ]\n}}\n')


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _mem_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    return 16.0
