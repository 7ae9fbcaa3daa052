"""Measure this CPU and fit the profile the cost model uses for device "cpu".

1. copy bandwidth vs working set (hot: activations) and from DRAM (cold: weights, KV, state);
2. a GEMM sweep per dtype, weights cold (cycled through a pool larger than the L3), each call
   between two probe runs, on a grid of M, K, N: the size-dependent GEMM efficiency table
   (hardware.CpuProfile.gemm_rate);
3. whole forward passes of calibration models (shapes unlike the validation models: hidden 512 /
   1024 / 1536, head_dim 64 and 128, GQA 3 and 4, two linear-attention kinds, a MoE with a shared
   expert) over a grid of batch sizes and context lengths including tiny steps, swept in several
   passes, with a speed probe before and after every timed forward (runner.SpeedProbe): an op's
   time is its median time / probe ratio times the probe's undisturbed time (reference.speed_time),
   and the profile records that probe time (meta.probe_us): the machine speed it is quoted at.
   Per cost class (hardware.op_class) a linear model  t = sum_f coef_f * feature_f  is fitted with
   non-negative coefficients, minimising the mean absolute relative error; the features are in
   hardware.CLASS_FEATURES: a constant per call (the fixed cost of an op's torch calls inside a
   forward), the GEMM table's time, FLOPs, softmax score elements, bytes of weights / state /
   activations, sequences, chunk steps, touched experts.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opdisagg_rt.analysis import reference as Rf
from opdisagg_rt.analysis.hardware import (
    BORROWS,
    CLASS_FEATURES,
    CPU_PROFILE,
    PROFILE_FORMAT,
    CpuProfile,
)
from opdisagg_rt.analysis.models import ModelSpec, parse_hf_config
from opdisagg_rt.analysis.ops import model_ops
from opdisagg_rt.analysis.runner import DTYPES, SpeedProbe, Timings, time_forwards
from opdisagg_rt.analysis.workload import Workload

POOL_BYTES = 192 << 20  # > the 105 MiB L3 here, so cycling through the pool keeps weights cold

# calibration models: shapes deliberately unlike validate.py's (SmolLM2: hidden 576, head_dim 64, GQA 3;
# tiny-hybrid: hidden 768, head_dim 64, GQA 3, GDN 4/8 heads of 64, 16 experts top-2), and unlike each
# other in hidden size, head_dim and GQA ratio so that per-element and per-call costs separate (both
# sliding-window layer sets have windows between the longest prompt and the longest decode context)
CAL_MODELS = {
    "cal-dense": dict(model_type="cal", vocab_size=16000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                      layer_types=["full_attention", "sliding_attention"] * 4, sliding_window=512),
    "cal-gdn-moe": dict(model_type="cal", vocab_size=16000, hidden_size=512, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                        layer_types=["linear_attention", "linear_attention", "full_attention",
                                     "linear_attention", "linear_attention", "sliding_attention"], sliding_window=1024,
                        linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=96,
                        linear_value_head_dim=96, linear_conv_kernel_dim=4, num_experts=32,
                        num_experts_per_tok=4, moe_intermediate_size=512, shared_expert_intermediate_size=1024),
    "cal-lightning": dict(model_type="minimax_text_01", vocab_size=16000, hidden_size=1536,
                          intermediate_size=4096, num_hidden_layers=6, num_attention_heads=12,
                          num_key_value_heads=4, head_dim=128, attn_type_list=[0, 0, 1] * 2),
}


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        with Rf.Timer() as t:
            fn()
        ts.append(t.total)
    return Rf.fast_time(ts)


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


def gemm_grid(full: bool, quick: bool) -> tuple[list[int], list[int], list[int]]:
    if quick:
        return [1, 16, 256], [512, 2048], [512, 8192]
    if full:  # the fitted dtype: every shape of a small model's projections, MLPs and heads lies inside
        return [1, 4, 16, 64, 256, 1024], [256, 512, 1024, 2048, 4096], [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    return [1, 16, 256], [512, 2048], [512, 4096, 32768]


def measure_gemm(dtype: str, quick: bool, verbose: bool, probe: SpeedProbe, full: bool = True) -> dict:
    """F.linear on a grid of (M, K, N), weights cycled through a pool beyond the L3. Each repetition
    runs between two runs of the speed probe (which also leaves the caches as the other ops of a
    forward pass do); kept as the median time / probe ratio, turned into log2 GFLOP/s by
    table_from_ratios once the calibration's undisturbed probe time is known."""
    dt = DTYPES[dtype]
    ms, ks, ns = gemm_grid(full, quick)
    pool = torch.empty(POOL_BYTES * 8 // torch.finfo(dt).bits, dtype=dt).normal_(0, 0.02)
    cube = np.full((len(ms), len(ks), len(ns)), np.nan)
    cap = 3e9 if quick else 2e10
    for a, K in enumerate(ks):
        for b, N in enumerate(ns):
            if K * N > min(1 << 26, pool.numel()):
                continue  # > 128 MiB of bf16 weights: filled from the nearest measured N below
            copies = max(1, pool.numel() // (K * N))
            ws = [pool[c * K * N:(c + 1) * K * N].view(N, K) for c in range(copies)]
            for i, M in enumerate(ms):
                if 2.0 * M * K * N > cap:
                    continue
                x = torch.randn(M, K, dtype=dt)
                F.linear(x, ws[0])  # warm-up (kernel selection)
                ratios, before = [], probe()
                for r in range(3 if quick else 5):
                    with Rf.Timer() as t:
                        F.linear(x, ws[(r + 1) % copies])
                    after = probe()
                    ratios.append(t.total / (0.5 * (before + after)))
                    before = after
                cube[i, a, b] = Rf.median(ratios)
        if verbose:
            print(f"  gemm {dtype} K={K:5d}: timed {int((~np.isnan(cube[:, a])).sum())} shapes")
    del pool
    return {"m": ms, "k": ks, "n": ns, "ratio": cube}


def table_from_ratios(g: dict, probe_ref: float) -> dict:
    """log2 GFLOP/s table (hardware.CpuProfile.gemm) from measure_gemm's ratios, holes filled."""
    ms, ks, ns = g["m"], g["k"], g["n"]
    flops = 2.0 * np.array(ms)[:, None, None] * np.array(ks)[None, :, None] * np.array(ns)[None, None, :]
    cube = np.log2(flops / (g["ratio"] * probe_ref) / 1e9)
    fill_table(cube, ms)
    return {"log2_m": np.log2(ms).tolist(), "log2_k": np.log2(ks).tolist(), "log2_n": np.log2(ns).tolist(),
            "log2_gflops": cube.tolist()}


def fill_table(cube: np.ndarray, ms: list[int]) -> None:
    """Fill the holes (shapes too large to time) of a [M, K, N] table of log2 GFLOP/s in place:
    along M by interpolation, beyond the largest measured M at its rate (more rows never lower the
    rate; an isotonic fit along M also pools timing noise), and a wider N than measured at the rate
    of the widest measured one."""
    lm = np.log2(ms)
    for a in range(cube.shape[1]):
        for b in range(cube.shape[2]):
            col = cube[:, a, b]
            ok = ~np.isnan(col)
            if ok.any():
                filled = col.copy()
                last = np.where(ok)[0][-1]
                filled[~ok] = np.interp(lm[~ok], lm[ok], col[ok])
                filled[last + 1:] = col[last]
                cube[:, a, b] = _isotonic(filled)
        for b in range(1, cube.shape[2]):
            if np.isnan(cube[0, a, b]):
                cube[:, a, b] = cube[:, a, b - 1]


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
        return [Workload("decode", 1, [(32, 1)]), Workload("decode", 4, [(256, 1)]),
                Workload("prefill", 1, [(16, 1)]), Workload("prefill", 1, [(128, 1)])]
    # tiny steps (decode at context 32, a 16-token prompt) pin the fixed per-call costs
    return ([Workload("decode", b, [(c, 1)]) for b, c in ((1, 32), (1, 256), (1, 2048), (8, 256), (8, 2048), (32, 256), (32, 2048))] +
            [Workload("prefill", 1, [(n, 1)]) for n in (16, 128, 512)] + [Workload("prefill", 4, [(192, 1)])])


def collect_samples(models: dict[str, ModelSpec], dtype: str, quick: bool, verbose: bool, probe: SpeedProbe,
                    passes: int = 3, forwards: int = 2) -> tuple[list[dict], Timings]:
    """(op, cost, measured ratio to the probe) for every op of every calibration forward; the
    times follow once the probe's undisturbed time over the whole calibration is known."""
    wls = _workloads(quick)
    tm = time_forwards(models, wls, dtype, 1 if quick else passes, forwards, "calibration ", verbose, probe)
    out, i = [], 0
    for name, spec in models.items():
        for w in wls:
            for o in model_ops(spec, w, 2 if dtype == "bf16" else 4):
                out.append({"op": o.op, "cost": o, "i": i, "model": name,
                            "workload": f"{w.phase} b={w.batch} ctx={w.context[0][0]}"})
            i += 1
    return out, tm


def nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||A x - b||, x >= 0, exactly, by trying every subset of columns (a handful here)."""
    n = A.shape[1]
    best, xbest = np.inf, np.zeros(n)
    for r in range(1, n + 1):
        for S in itertools.combinations(range(n), r):
            x, *_ = np.linalg.lstsq(A[:, S], b, rcond=None)
            if (x < 0).any():
                continue
            res = float(((A[:, S] @ x - b) ** 2).sum())
            if res < best:
                best, xbest = res, np.zeros(n)
                xbest[list(S)] = x
    return xbest


def fit_linear(X: np.ndarray, t: np.ndarray, iters: int = 25, base: np.ndarray | None = None) -> np.ndarray:
    """Non-negative coefficients minimising mean |base + X c - t| / t (IRLS on the relative error),
    so that small and large operations weigh alike and a few disturbed samples do not pull the fit;
    `base`: a known part of each time (another class's work inside these ops)."""
    scale = np.maximum(np.abs(X).max(0), 1e-30)  # conditioning; undone at the end
    A = X / scale / t[:, None]
    b = np.ones(len(t)) if base is None else 1 - base / t
    c = nnls(A, b)
    for _ in range(iters):
        w = 1 / np.sqrt(np.maximum(np.abs(A @ c - b), 1e-3))
        c = nnls(A * w[:, None], b * w)
    return c / scale


def fit_profile(samples: list[dict], prof: CpuProfile) -> CpuProfile:
    dtype = prof.dtype
    by: dict[str, tuple[list, list, list]] = {}
    for s in samples:
        cls, f = prof.op_features(s["cost"], dtype)
        X, t, F_ = by.setdefault(cls, ([], [], []))
        X.append([f[k] for k in CLASS_FEATURES[cls.split("[")[0]]])
        t.append(s["t"] * 1e6)
        F_.append(f)
    prof.curves = {}
    # classes that others borrow from first (MoE's GEMMs cost what the gemm class says)
    for cls in sorted(by, key=lambda c: c in BORROWS):
        X, t, feats = np.array(by[cls][0]), np.array(by[cls][1]), by[cls][2]
        base = np.array([prof.borrowed_us(cls, f) for f in feats])
        c = fit_linear(X, t, base=base)
        err = np.abs(base + X @ c - t) / t
        names = CLASS_FEATURES[cls.split("[")[0]]
        prof.curves[cls] = {"coef": {k: float(v) for k, v in zip(names, c)}, "n": len(t),
                            "fit_median_abs_err_pct": float(100 * np.median(err)),
                            "fit_p90_abs_err_pct": float(100 * np.percentile(err, 90))}
    prof.curves = dict(sorted(prof.curves.items()))
    # [model, workload, op, measured us, fitted us]: FLOPs and bytes follow from ops.model_ops
    prof.samples = [[s["model"], s["workload"], s["op"], s["t"] * 1e6, prof.op_time(s["cost"], dtype)[0] * 1e6]
                    for s in samples]
    return prof


def calibrate(out: str | Path | None = None, quick: bool = False, verbose: bool = True, threads: int = 1,
              dtype: str = "bf16", passes: int = 4) -> dict:
    """Measure, fit, write the profile (default: the package's data/cpu_profile.json); return it."""
    load0 = os.getloadavg()[0]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # one intra-op thread: stable on a shared box, and per-stage threads are explicit
    t0, c0 = time.time(), time.process_time()
    try:
        probe = SpeedProbe()
        with torch.inference_mode():
            hot, dram = measure_bandwidth(quick)
            if verbose:
                print(f"  DRAM copy {dram:.1f} GB/s; hot copy " + " ".join(f"{g:.0f}" for g in hot["gbps"]) + " GB/s")
            other = "fp32" if dtype == "bf16" else "bf16"
            ratios = {dtype: measure_gemm(dtype, quick, verbose, probe),
                      other: measure_gemm(other, quick, verbose, probe, full=False)}
        models = {k: parse_hf_config(v, k) for k, v in CAL_MODELS.items()}
        if quick:
            models.pop("cal-lightning")
        samples, tm = collect_samples(models, dtype, quick, verbose, probe, passes)
        ref = probe.ref  # the probe's undisturbed time over the whole calibration: the speed everything is quoted at
        gemm = {d: table_from_ratios(g, ref) for d, g in ratios.items()}
        for s in samples:
            s["t"] = tm.time(s.pop("i"), s["op"], ref)
        prof = CpuProfile(gemm, {}, hot, dram, {"dtype": dtype, "format": PROFILE_FORMAT,
                                                "probe_us": ref * 1e6, "probe_median_us": Rf.median(probe.history) * 1e6})
        prof = fit_profile(samples, prof)
    finally:
        torch.set_num_threads(prev)
    prof.meta = {**prof.meta, "threads": threads, "dtype": dtype, "quick": quick, "passes": 1 if quick else passes,
                 "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
                 "cpu": _cpu_name(), "mem_gb": _mem_gb(), "torch": torch.__version__,
                 "cal_models": CAL_MODELS,  # the samples' shapes, so that a profile can be refitted from its samples
                 "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if verbose:
        for cls, c in prof.curves.items():
            terms = ", ".join(f"{k} {v:.4g}" for k, v in c["coef"].items() if v)
            print(f"  {cls:28s} n={c['n']:4d} fit |err| median {c['fit_median_abs_err_pct']:4.1f}%: {terms} (us per unit)")
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
