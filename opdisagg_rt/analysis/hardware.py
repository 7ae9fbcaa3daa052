"""Devices, links, and the time an operation takes on a device.

GPUs use a roofline with size-dependent efficiency: a kernel of F FLOPs and B bytes takes
  overhead + max(F / (P * e_c(F)), B / (W * e_m(B)))   with e(x) = e_max * x / (x + x_half),
so small kernels never reach peak. The measured CPU profile (calibrate.py) replaces the curves
with fitted tables of this machine.
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
        out["cpu"] = cpu_device(CPU_PROFILE, links.get("shm"))
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


@dataclass(slots=True)
class CpuProfile:
    """Fitted by calibrate.py: gemm_fit, the GEMM curve fitted on GEMMs timed inside forward passes;
    curves[kind]: (overhead_us, gflops_max, half_mflop, gbps, act_eff) of the other kinds; hot:
    copy bandwidth vs working set (activations stay in cache); gemm: the isolated GEMM sweep."""
    gemm: dict[str, dict[str, list]]  # the isolated sweep, kept as measured (reference data)
    curves: dict[str, dict[str, float]]
    hot: dict[str, list[float]]
    dram_gbps: float
    gemm_fit: dict[str, float]  # overhead_us, gflops_max, m_half, gbps: fitted on in-forward GEMMs
    meta: dict[str, Any] = field(default_factory=dict)
    samples: list = field(default_factory=list)  # raw calibration measurements, for refits and audits

    def gemm_time(self, M: float, K: float, N: float, dtype: str) -> float:
        """Fitted in-forward GEMM curve: o + max(2MKN / (R M / (M + M_half)), weight + activation bytes / bw).
        The rate's dependence on M is the size-dependent efficiency (M = 1 is a GEMV)."""
        f = self.gemm_fit
        b = 4 if dtype == "fp32" else 2
        rc, rm = self.dtype_ratio(dtype)
        tc = 2 * M * K * N / (rc * f["gflops_max"] * 1e9 * M / (M + f["m_half"]))
        tm = (K * N + M * (K + N)) * b / (rm * f["gbps"] * 1e9)
        return f["overhead_us"] * 1e-6 + max(tc, tm)

    def dtype_ratio(self, dtype: str) -> tuple[float, float]:
        """(compute, bandwidth) ratio of `dtype` to the fitted dtype, from the isolated sweeps:
        the rate ratio at the largest M and the weight-bytes/s ratio at M = 1."""
        base = self.meta.get("dtype", "bf16")
        if dtype == base or dtype not in self.gemm or base not in self.gemm:
            return 1.0, 1.0
        a, b = self.gemm[dtype]["log2_gflops"], self.gemm[base]["log2_gflops"]
        big = sum(2 ** v for row in a[-1] for v in row) / sum(2 ** v for row in b[-1] for v in row)
        one = sum(2 ** v for row in a[0] for v in row) / sum(2 ** v for row in b[0] for v in row)
        bsz = {"fp32": 4, "bf16": 2}
        return big, one * bsz.get(dtype, 2) / bsz.get(base, 2)

    def hot_bw(self, nbytes: float) -> float:
        return _interp(self.hot["log2_bytes"], self.hot["gbps"], nbytes) * 1e9

    def op_time(self, op: OpCost, dtype: str) -> tuple[float, str]:
        if op.kind in ("gemm", "moe") and op.gemms:
            t = sum(c * self.gemm_time(M, K, N, dtype) for M, K, N, c in op.gemms if M > 0 and c > 0)
            if op.kind == "moe":  # routing, gather/scatter of tokens per touched expert
                c = self.curves["moe"]
                t += c["overhead_us"] * 1e-6 + sum(cnt for M, K, N, cnt in op.gemms[1:2]) * c["per_expert_us"] * 1e-6
            mem = op.weight_bytes / (self.dram_gbps * 1e9)
            return t, "memory" if mem > 0.5 * t else "compute"
        c = (op.decode and self.curves.get(op.kind + "_decode")) or self.curves.get(op.kind) or self.curves["norm"]
        tc = 0.0
        if op.flops:
            F = op.flops / 1e6
            tc = op.flops / (c["gflops_max"] * 1e9 * F / (F + c["half_mflop"]))
        tm = ((op.weight_bytes + op.state_bytes) / (c.get("gbps", self.dram_gbps) * 1e9)
              + op.act_bytes / (c.get("act_eff", 1.0) * self.hot_bw(op.act_bytes)))
        return c["overhead_us"] * 1e-6 + max(tc, tm), "compute" if tc > tm else "memory"

    def to_json(self) -> dict:
        return {"meta": self.meta, "gemm_fit": self.gemm_fit, "curves": self.curves, "hot": self.hot,
                "dram_gbps": self.dram_gbps, "gemm": self.gemm, "samples": self.samples}


def cpu_device(profile_path: str | Path, link: Link | None = None) -> Device:
    d = json.loads(Path(profile_path).read_text())
    prof = CpuProfile(d["gemm"], d["curves"], d["hot"], d["dram_gbps"], d["gemm_fit"], d.get("meta", {}))
    peak = prof.gemm_fit["gflops_max"] / 1e3
    mem_gb = d.get("meta", {}).get("mem_gb", 16.0)
    return Device("cpu", {"bf16": peak, "fp32": peak * prof.dtype_ratio("fp32")[0]}, mem_gb, prof.dram_gbps / 1e3, None,
                  {"scale_up": link or Link("shm", 5, 30)}, profile=prof)
