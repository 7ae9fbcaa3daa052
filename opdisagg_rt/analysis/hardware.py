"""Devices, links, and the time an operation takes on a device.

GPUs use a roofline with size-dependent efficiency: a kernel of F FLOPs and B bytes takes
  overhead + max(F / (P * e_c(F)), B / (W * e_m(B)))   with e(x) = e_max * x / (x + x_half),
so small kernels never reach peak. The measured CPU profile (calibrate.py) replaces the curves
with this machine's measured GEMM table and per-class cost models fitted on timed forward passes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opdisagg_rt.analysis.ops import OpCost

HW_FILE = Path(__file__).with_name("hardware.yaml")
CPU_PROFILE = Path(__file__).parent / "data" / "cpu_profile.json"


@dataclass(slots=True)
class Link:
    name: str
    gbps: float  # GB/s per direction
    latency_us: float

    def time(self, nbytes: float) -> float:
        """Seconds to send one message of nbytes."""
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)


@dataclass(slots=True)
class Device:
    name: str
    tflops: dict[str, float]  # dtype -> dense peak
    mem_gb: float
    mem_tbps: float
    price_per_hour: float | None = None
    links: dict[str, Link] = field(default_factory=dict)  # scale_up / scale_out / host
    compute_eff: float = 0.75
    memory_eff: float = 0.9
    compute_half_us: float = 2.0
    memory_half_us: float = 1.0
    overhead_us: float = 4.0
    profile: Any = None  # CpuProfile for measured devices

    def peak(self, dtype: str) -> float:
        t = self.tflops.get(dtype)
        if not t:
            raise ValueError(f"device {self.name} has no {dtype} throughput in its spec")
        return t * 1e12

    @property
    def ridge(self) -> float:
        """FLOP/byte where BF16 compute time equals memory time (peak numbers)."""
        return self.peak("bf16") / (self.mem_tbps * 1e12)

    def op_time(self, op: OpCost, dtype: str = "bf16") -> tuple[float, str]:
        """(seconds, bound) of one operation on one device."""
        if self.profile is not None:
            return self.profile.op_time(op, dtype)
        P, W = self.peak(dtype) * self.compute_eff, self.mem_tbps * 1e12 * self.memory_eff
        # e(x) = x/(x+x_half) turns into a fixed ramp-up term: F/(P e(F)) = F/P + x_half/P
        tc = (op.flops / P + self.compute_half_us * 1e-6) if op.flops else 0.0
        tm = (op.bytes / W + self.memory_half_us * 1e-6) if op.bytes else 0.0
        # the bound is the side whose streaming term is larger; ramp-up terms only add latency
        return self.overhead_us * 1e-6 + max(tc, tm), "compute" if op.flops / P > op.bytes / W else "memory"


def _load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'devices' (and optionally 'links', 'defaults')")
    return data


def load_hardware(extra: str | Path | None = None) -> dict[str, Device]:
    """Built-in devices (+ the measured CPU if profiled) plus a user's YAML with the same layout."""
    data = _load_yaml(HW_FILE)
    if extra:
        user = _load_yaml(Path(extra))
        data["links"] = {**data.get("links", {}), **user.get("links", {})}
        data["devices"] = {**data["devices"], **user.get("devices", {})}
        data["defaults"] = {**data["defaults"], **user.get("defaults", {})}
    links = {k: Link(k, float(v["gbps"]), float(v["latency_us"])) for k, v in data["links"].items()}
    out = {}
    for name, d in data["devices"].items():
        for key in ("bf16_tflops", "mem_gb", "mem_tbps"):
            if d.get(key) is None:
                raise ValueError(f"device {name!r}: field '{key}' is required")
        dev_links = {}
        for role in ("scale_up", "scale_out", "host"):
            if d.get(role):
                if d[role] not in links:
                    raise ValueError(f"device {name!r}: field '{role}' names unknown link {d[role]!r}")
                dev_links[role] = links[d[role]]
        eff = {k: float(d.get(k, v)) for k, v in data["defaults"].items()}
        out[name] = Device(name, {"bf16": float(d["bf16_tflops"]), "fp8": float(d.get("fp8_tflops") or 0)},
                           float(d["mem_gb"]), float(d["mem_tbps"]), d.get("price_per_hour"), dev_links, **eff)
    if CPU_PROFILE.exists() and "cpu" not in out:
        try:
            out["cpu"] = cpu_device(CPU_PROFILE, links.get("shm"))
        except ValueError:  # a profile of an older format: `cpu` stays unknown until recalibrated
            pass
    return out


def get_device(name: str, extra: str | Path | None = None, profile: str | Path | None = None) -> Device:
    if name == "cpu" and profile:
        return cpu_device(profile)
    hw = load_hardware(extra)
    if name not in hw:
        hint = " (run `python -m opdisagg_rt.analyze calibrate` first)" if name == "cpu" else ""
        raise ValueError(f"unknown device {name!r}{hint}; known: {', '.join(sorted(hw))}")
    return hw[name]


# ---- measured CPU -------------------------------------------------------------------------

def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear in log2(x), clamped at the ends."""
    lx = math.log2(max(x, 1e-12))
    if lx <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if lx <= xs[i]:
            t = (lx - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


PROFILE_FORMAT = 2  # 2: per-class linear cost models over shape features + a cold-weight GEMM table


def _grid_interp(axes: list[list[float]], cube, point: list[float]) -> float:
    """Multilinear interpolation on a regular grid (axes in log2 units), clamped at the edges."""
    idx = []
    for g, x in zip(axes, point):
        x = min(max(x, g[0]), g[-1])
        j = 0
        while j < len(g) - 2 and x > g[j + 1]:
            j += 1
        f = 0.0 if len(g) == 1 else (x - g[j]) / (g[j + 1] - g[j])
        idx.append((j, f, len(g) > 1))
    out = 0.0
    for corner in range(1 << len(idx)):
        w, c = 1.0, cube
        for d, (j, f, more) in enumerate(idx):
            hi = (corner >> d) & 1
            if hi and not more:
                w = 0.0
                break
            w *= f if hi else 1.0 - f
            c = c[j + hi]
        if w:
            out += w * c
    return out


# features of each cost class (microseconds per unit, fitted by calibrate.py); see op_features()
CLASS_FEATURES = {
    "gemm": ("table_us", "calls", "ew_melems", "weight_mb"),
    "moe": ("one", "experts", "ew_melems"),  # + its GEMMs at the gemm class's cost (BORROWS)
    "norm": ("one", "act_mb", "weight_mb"),
    "embed": ("one", "act_mb"),
    "attn": ("one", "mflop", "mscores", "mb"),  # prompt K/V written and q, k, v, out: one stream
    "attn_decode": ("one", "seqs", "mscores", "state_mb", "mflop"),
    "linear_attn": ("one", "steps", "mflop", "state_mb", "act_mb"),
    "linear_attn_decode": ("one", "mflop", "state_mb"),  # batched over sequences: no per-sequence constant
}


# a class whose operations contain another class's work: MoE runs its router, expert and shared-expert
# GEMMs as the same F.linear calls as any projection, so they cost what the gemm class says; the
# MoE's own terms are the routing, the gather / scatter per touched expert and the element-wise work
BORROWS = {"moe": ("gemm", ("table_us", "calls", "weight_mb"))}


def op_class(op: OpCost) -> str:
    """Cost class of an operation: its kind; attention cores per algorithm (full, sliding window,
    Gated DeltaNet, Lightning, MLA run different kernels) with the decode form apart."""
    if op.kind in ("gemm", "moe", "norm", "embed"):
        return op.kind
    base = op.kind + ("_decode" if op.decode else "")
    return f"{base}[{op.attn_kind}]" if op.attn_kind else base


@dataclass(slots=True)
class CpuProfile:
    """Measured by calibrate.py.

    gemm[dtype]: the GEMM sweep (weights cold, from DRAM; each call right after the speed probe) as
    log2 GFLOP/s on a grid of log2 M, K, N: the size-dependent GEMM efficiency table. curves[class]: a linear model
    t = sum_f coef[f] * feature_f (microseconds) per cost class (op_class), fitted on operations timed
    inside whole forward passes; its constant (`one`, `calls`, `seqs`, `steps`, `experts`) terms are
    the fixed per-call costs that dominate small operations (Python dispatch, kernel start-up, cold
    instruction and data caches after the previous operation). hot: copy bandwidth vs working set."""
    gemm: dict[str, dict[str, list]]
    curves: dict[str, dict[str, Any]]
    hot: dict[str, list[float]]
    dram_gbps: float
    meta: dict[str, Any] = field(default_factory=dict)
    samples: list = field(default_factory=list)  # raw calibration measurements, for refits and audits

    @classmethod
    def from_json(cls, d: dict, path: str | Path = "profile") -> CpuProfile:
        fmt = d.get("meta", {}).get("format", 1)
        if fmt != PROFILE_FORMAT or "curves" not in d:
            raise ValueError(f"{path}: CPU profile format {fmt}, this version reads format {PROFILE_FORMAT}: "
                             "rerun `python -m opdisagg_rt.analyze calibrate`")
        return cls(d["gemm"], d["curves"], d["hot"], d["dram_gbps"], d.get("meta", {}), d.get("samples", []))

    @property
    def dtype(self) -> str:
        return self.meta.get("dtype", "bf16")

    def gemm_rate(self, M: float, K: float, N: float, dtype: str) -> float:
        """FLOP/s of one GEMM (M rows, K in, N out; weights cold) from the measured table."""
        g = self.gemm.get(dtype) or self.gemm[self.dtype]
        axes = [g["log2_m"], g["log2_k"], g["log2_n"]]
        pt = [math.log2(max(M, 1.0)), math.log2(max(K, 1.0)), math.log2(max(N, 1.0))]
        r = 2 ** _grid_interp(axes, g["log2_gflops"], pt) * 1e9
        if dtype not in self.gemm and M < 16:  # a dtype without a sweep: few-row GEMMs stream weights,
            r *= 2 / {"fp32": 4, "fp8": 1}.get(dtype, 2)  # so scale by element size vs the 2-byte sweep
        return r

    def gemm_time(self, M: float, K: float, N: float, dtype: str) -> float:
        """Seconds of one GEMM, from the table."""
        return 2 * max(M, 1.0) * K * N / self.gemm_rate(M, K, N, dtype)

    @property
    def peak_gflops(self) -> float:
        g = self.gemm[self.dtype]["log2_gflops"]
        return max(2 ** v for plane in g for row in plane for v in row)

    def hot_bw(self, nbytes: float) -> float:
        return _interp(self.hot["log2_bytes"], self.hot["gbps"], nbytes) * 1e9

    def op_features(self, op: OpCost, dtype: str) -> tuple[str, dict[str, float]]:
        """(cost class, feature values) of one operation; units match the fitted coefficients."""
        cls = op_class(op)
        f = {"one": 1.0, "mb": op.bytes / 1e6, "act_mb": op.act_bytes / 1e6, "state_mb": op.state_bytes / 1e6,
             "weight_mb": op.weight_bytes / 1e6, "mflop": op.flops / 1e6, "mscores": op.scores / 1e6,
             "seqs": op.seqs, "steps": op.steps, "ew_melems": op.ew_elems / 1e6}
        if op.kind in ("gemm", "moe"):
            f["table_us"] = sum(c * self.gemm_time(M, K, N, dtype) for M, K, N, c in op.gemms if M > 0 and c > 0) * 1e6
            f["calls"] = sum(c for M, K, N, c in op.gemms if M > 0)
            f["experts"] = op.gemms[1][3] if op.kind == "moe" and len(op.gemms) > 1 else 0.0
        return cls, f

    def curve(self, cls: str) -> dict[str, float]:
        """Coefficients of a class, else of a calibrated sibling: the same kind for another algorithm
        (e.g. Lightning for Gated DeltaNet, full attention for MLA), then the prefill form for an
        uncalibrated decode form, then attention for linear attention."""
        if cls in self.curves:
            return self.curves[cls]["coef"]
        base = cls.split("[")[0]
        for b in (base, base.replace("_decode", ""), "attn_decode" if "decode" in base else "attn", "norm"):
            for k in sorted(self.curves):
                if k.split("[")[0] == b:
                    return self.curves[k]["coef"]
        raise ValueError(f"CPU profile has no cost class {cls!r} (calibrated: {', '.join(sorted(self.curves))})")

    def borrowed_us(self, cls: str, f: dict[str, float]) -> float:
        """Microseconds of the work a class borrows from another (BORROWS), 0 if none."""
        if cls not in BORROWS:
            return 0.0
        other, names = BORROWS[cls]
        coef = self.curve(other)
        return sum(coef.get(k, 0.0) * f.get(k, 0.0) for k in names)

    def op_time(self, op: OpCost, dtype: str) -> tuple[float, str]:
        cls, f = self.op_features(op, dtype)
        coef = self.curve(cls)
        t = (sum(c * f.get(k, 0.0) for k, c in coef.items()) + self.borrowed_us(cls, f)) * 1e-6
        ridge = self.peak_gflops / self.dram_gbps  # FLOP/byte where the best GEMM rate meets DRAM bandwidth
        return t, "compute" if op.bytes and op.intensity > ridge else "memory"

    def to_json(self) -> dict:
        return {"meta": {**self.meta, "format": PROFILE_FORMAT}, "curves": self.curves, "hot": self.hot,
                "dram_gbps": self.dram_gbps, "gemm": self.gemm, "samples": self.samples}


def cpu_device(profile_path: str | Path, link: Link | None = None) -> Device:
    d = json.loads(Path(profile_path).read_text())
    prof = CpuProfile.from_json(d, profile_path)
    peak = prof.peak_gflops / 1e3
    mem_gb = prof.meta.get("mem_gb", 16.0)
    tflops = {dt: max(2 ** v for plane in g["log2_gflops"] for row in plane for v in row) / 1e3 for dt, g in prof.gemm.items()}
    return Device("cpu", {"bf16": peak, **tflops}, mem_gb, prof.dram_gbps / 1e3, None,
                  {"scale_up": link or Link("shm", 5, 30)}, profile=prof)
