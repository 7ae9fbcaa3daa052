"""Run a ModelSpec's operations with the reference torch code on this CPU and time each one.

A whole forward pass runs layer after layer (random weights, random KV/state contents), so each
operation meets the cache state it has in a real step: a model larger than the last-level cache
streams its weights and KV from DRAM. A speed probe runs around every forward pass; an op's time is
the median of its time / the probe's over the repetitions, times the probe's undisturbed time
(reference.speed_time), which is much steadier on this shared machine than any raw statistic.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opdisagg_rt.analysis import reference as R
from opdisagg_rt.analysis.models import ModelSpec
from opdisagg_rt.analysis.workload import Workload

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _w(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype).normal_(0, 0.02)


CACHES = ("k", "v", "conv_state", "state")  # per-batch tensors; everything else in a layer is a weight


class RefModel:
    """Weights and caches of `spec` for batch B at up to `max_len` tokens. `like`: a RefModel of the
    same spec whose weights are reused (only the caches are allocated), to sweep a grid quickly."""

    def __init__(self, spec: ModelSpec, dtype: str, batch: int, max_len: int, like: RefModel | None = None):
        self.s, self.dt, self.B, self.L = spec, DTYPES[dtype], batch, max_len
        s, dt, h = spec, self.dt, spec.hidden_size
        if like is not None and like.s is spec and like.dt == dt:
            self.embed, self.head = like.embed, like.head
            self.layers = []
            for l, q in zip(s.layers, like.layers):
                p = {k: v for k, v in q.items() if k not in CACHES}
                if l.attn in ("full", "sliding"):
                    p["k"] = torch.randn(batch, s.num_kv_heads, max_len, s.head_dim, dtype=dt)
                    p["v"] = torch.randn(batch, s.num_kv_heads, max_len, s.head_dim, dtype=dt)
                elif l.attn == "gdn":
                    p["conv_state"] = torch.randn(batch, q["conv_state"].shape[1], s.lin_conv, dtype=dt)
                    p["state"] = torch.randn(batch, s.lin_v_heads, s.lin_k_dim, s.lin_v_dim) * 0.01
                elif l.attn == "lightning":
                    p["state"] = torch.randn(batch, s.lin_v_heads, s.lin_v_dim, s.lin_v_dim) * 0.01
                self.layers.append(p)
            return
        self.embed = _w(s.vocab_size, h, dtype=dt)
        self.head = self.embed if s.tie_embeddings else _w(s.vocab_size, h, dtype=dt)
        self.layers = []
        for l in s.layers:
            p: dict = {"n1": torch.ones(h, dtype=dt), "n2": torch.ones(h, dtype=dt)}
            if l.attn in ("full", "sliding"):
                p["qkv"] = _w(s.q_dim + 2 * s.kv_dim, h, dtype=dt)
                p["o"] = _w(h, s.q_dim, dtype=dt)
                p["k"] = torch.randn(batch, s.num_kv_heads, max_len, s.head_dim, dtype=dt)
                p["v"] = torch.randn(batch, s.num_kv_heads, max_len, s.head_dim, dtype=dt)
            elif l.attn == "gdn":
                kd, vd, Hv = s.lin_k_heads * s.lin_k_dim, s.lin_v_heads * s.lin_v_dim, s.lin_v_heads
                p["qkv"] = _w(2 * kd + 2 * vd + 2 * Hv, h, dtype=dt)
                p["conv"] = _w(2 * kd + vd, s.lin_conv, dtype=dt)
                p["conv_state"] = torch.randn(batch, 2 * kd + vd, s.lin_conv, dtype=dt)
                p["state"] = torch.randn(batch, Hv, s.lin_k_dim, s.lin_v_dim) * 0.01
                p["o"] = _w(h, vd, dtype=dt)
                p["onorm"] = torch.ones(s.lin_v_dim, dtype=dt)
            elif l.attn == "lightning":
                H, d = s.lin_v_heads, s.lin_v_dim
                p["qkv"] = _w(4 * H * d, h, dtype=dt)
                p["decay"] = torch.linspace(0.9, 0.999, H)
                p["state"] = torch.randn(batch, H, d, d) * 0.01
                p["o"] = _w(h, H * d, dtype=dt)
                p["onorm"] = torch.ones(H * d, dtype=dt)
            else:
                raise ValueError(f"the CPU runner has no reference for {l.attn!r} layers")
            if l.moe:
                E, I = s.num_experts, s.expert_size
                p["router"] = _w(E, h, dtype=dt)
                p["gu"] = _w(E, 2 * I, h, dtype=dt)
                p["down"] = _w(E, h, I, dtype=dt)
                if s.shared_size:
                    p["shared"] = (_w(2 * s.shared_size, h, dtype=dt), _w(h, s.shared_size, dtype=dt))
            else:
                p["gu"] = _w(2 * s.intermediate_size, h, dtype=dt)
                p["down"] = _w(h, s.intermediate_size, dtype=dt)
            self.layers.append(p)

    def _attn(self, l, p, qkv: torch.Tensor, B: int, n: int, pos: int) -> torch.Tensor:
        s = self.s
        if l.attn in ("full", "sliding"):
            H, Hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
            q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
            if n == 1:
                return R.attn_decode(q.view(B, H, d), p["k"], p["v"], k.view(B, Hkv, d), v.view(B, Hkv, d), pos, l.window)
            q, k, v = (t.view(B, n, -1, d).transpose(1, 2) for t in (q, k, v))
            p["k"][:, :, :n], p["v"][:, :, :n] = k, v  # fill the cache for the following decode steps
            return R.attn_prefill(q, k, v, l.window).reshape(B * n, -1)
        if l.attn == "lightning":
            H, d = s.lin_v_heads, s.lin_v_dim
            q, k, v, gate = (t.reshape(B, n, H, d).transpose(1, 2) for t in qkv.split(H * d, dim=-1))
            if n == 1:
                o = R.lightning_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], p["decay"], p["state"])
            else:
                o = R.lightning_chunked(q, k, v, p["decay"]).transpose(1, 2)
            o = R.rms_norm(o.reshape(B * n, H * d).to(self.dt), p["onorm"])
            return o * torch.sigmoid(gate.transpose(1, 2).reshape(B * n, H * d))
        Hk, Hv, dk, dv = s.lin_k_heads, s.lin_v_heads, s.lin_k_dim, s.lin_v_dim
        kd, vd = Hk * dk, Hv * dv
        mixed, z, b, a = qkv.split([2 * kd + vd, vd, Hv, Hv], dim=-1)
        if n == 1:
            mixed = R.causal_conv_step(mixed, p["conv_state"], p["conv"])
        else:
            mixed = R.causal_conv(mixed.view(B, n, -1), p["conv"]).reshape(B * n, -1)
        q, k, v = mixed.split([kd, kd, vd], dim=-1)
        rep = Hv // Hk  # key heads shared by value heads (GQA-like)
        q, k = (F.normalize(t.reshape(B, n, Hk, dk).float(), dim=-1).repeat_interleave(rep, 2) for t in (q, k))
        v = v.reshape(B, n, Hv, dv)
        g = -F.softplus(a.float()).view(B, n, Hv)
        beta = torch.sigmoid(b.float()).view(B, n, Hv)
        if n == 1:
            o = R.gdn_decode(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], p["state"])
        else:
            o, p["state"] = R.gdn_chunked(*(t.transpose(1, 2) for t in (q, k, v, g, beta)))
            o = o.transpose(1, 2)
        o = R.rms_norm(o.reshape(B * n, Hv, dv).to(self.dt), p["onorm"]) * F.silu(z.view(B * n, Hv, dv))
        return o.reshape(B * n, vd)

    def forward(self, w: Workload, times: dict[str, list[float]]) -> None:
        """One step of `w` (whole prompts without prefix, or decode), appending each op's time."""
        g = w.groups()
        if len(g) != 1 or (g[0].new > 1 and g[0].past):
            raise ValueError("the CPU runner times single-group decode or prefix-free prefill steps")
        B, n, pos = int(g[0].count), g[0].new, g[0].past
        s, T = self.s, int(g[0].count) * g[0].new
        ids = torch.randint(0, s.vocab_size, (T,))

        def run(name, fn, *args):
            with R.Timer() as t:
                out = fn(*args)
            times.setdefault(name, []).append(t.total)
            return out

        resid = run("embed", F.embedding, ids, self.embed)
        for i, (l, p) in enumerate(zip(s.layers, self.layers)):
            pre = f"layers.{i}."
            hdn = run(pre + "attn_norm", R.rms_norm, resid, p["n1"])
            qkv = run(pre + "qkv_proj", F.linear, hdn, p["qkv"])
            ao = run(pre + "attn", self._attn, l, p, qkv, B, n, pos)
            run(pre + "o_proj", lambda: resid.add_(F.linear(ao, p["o"])))
            hdn = run(pre + "mlp_norm", R.rms_norm, resid, p["n2"])
            if l.moe:
                run(pre + "moe", lambda: resid.add_(R.moe(hdn, p["router"], p["gu"], p["down"], s.top_k, p.get("shared"))))
            else:
                run(pre + "mlp", lambda: resid.add_(R.gated_mlp(hdn, p["gu"], p["down"])))
        last = resid.view(B, n, -1)[:, -1]
        hl = run("final_norm", R.rms_norm, last, torch.ones(s.hidden_size, dtype=self.dt))
        run("lm_head", F.linear, hl, self.head)


class SpeedProbe:
    """A fixed small workload (GEMV and 64-row GEMM over cold weights, an RMSNorm: 12 torch calls,
    ~5 ms) timed around every measurement. This 2-core machine is shared: other processes and the
    host change its speed by up to 2x for seconds at a time, and every operation slows down with it
    (the probe's time correlates 0.9 with a forward pass's). An operation's time divided by the
    probe's time next to it is much steadier than the time itself (reference.speed_time)."""

    def __init__(self):
        bf = torch.bfloat16
        self.pool = torch.empty(48 << 20, dtype=bf).normal_(0, 0.02)  # 96 MiB: weights come from DRAM
        self.K, self.N = 576, 1728
        self.copies = self.pool.numel() // (self.K * self.N)
        self.x1, self.x64 = torch.randn(1, self.K, dtype=bf), torch.randn(64, self.K, dtype=bf)
        self.wn = torch.ones(self.K, dtype=bf)
        self.i = 0
        self.history: list[float] = []

    def _w(self) -> torch.Tensor:
        self.i = (self.i + 1) % self.copies
        return self.pool[self.i * self.K * self.N:(self.i + 1) * self.K * self.N].view(self.N, self.K)

    def __call__(self) -> float:
        with torch.inference_mode(), R.Timer() as t:
            for _ in range(4):
                F.linear(self.x1, self._w())
                F.linear(self.x64, self._w())
                R.rms_norm(self.x64, self.wn)
        self.history.append(t.total)
        return t.total

    @property
    def ref(self) -> float:
        """The probe's undisturbed time in this run: its fastest repetition."""
        return min(self.history)


@dataclass
class Timings:
    """Per (model, workload) run and op name: raw seconds and seconds / probe of each repetition."""
    raw: list[dict[str, list[float]]]
    ratio: list[dict[str, list[float]]]
    probe: SpeedProbe

    def time(self, i: int, op: str, probe_ref: float | None = None) -> float:
        """Seconds at the run's undisturbed speed (or at `probe_ref`): reference.speed_time."""
        return R.speed_time(self.ratio[i][op], probe_ref or self.probe.ref)


def time_forwards(models: dict[str, ModelSpec], workloads: list[Workload], dtype: str, passes: int, forwards: int,
                  label: str = "", verbose: bool = False, probe: SpeedProbe | None = None) -> Timings:
    """Every op of every (model, workload) run, over `passes` sweeps of the whole grid with
    `forwards` timed forward passes each (after one warm-up), so that the repetitions of one op are
    spread over minutes; the speed probe runs before and after each timed forward."""
    probe = probe or SpeedProbe()
    runs = [(name, spec, w) for name, spec in models.items() for w in workloads]
    raw: list[dict[str, list[float]]] = [{} for _ in runs]
    ratio: list[dict[str, list[float]]] = [{} for _ in runs]
    for p in range(passes):
        t0 = time.time()
        like: dict[str, RefModel] = {}
        for i, (name, spec, w) in enumerate(runs):
            g = w.groups()[0]
            ref = RefModel(spec, dtype, int(g.count), g.past + g.new, like=like.get(name))
            like[name] = ref
            with torch.inference_mode():
                ref.forward(w, {})  # warm-up
                for _ in range(forwards):
                    one: dict[str, list[float]] = {}
                    before = probe()
                    ref.forward(w, one)
                    speed = 0.5 * (before + probe())
                    for op, ts in one.items():
                        raw[i].setdefault(op, []).extend(ts)
                        ratio[i].setdefault(op, []).extend(t / speed for t in ts)
        del like, ref
        if verbose:
            print(f"  {label}pass {p + 1}/{passes}: {time.time() - t0:.0f}s, load {os.getloadavg()[0]:.1f}, "
                  f"probe {probe.ref * 1e3:.2f} ms (median {R.median(probe.history) * 1e3:.2f})")
    return Timings(raw, ratio, probe)


def measure(spec: ModelSpec, w: Workload, dtype: str = "bf16", reps: int = 5, model: RefModel | None = None) -> dict[str, float]:
    """Seconds per operation name over `reps` forwards after one warm-up (reference.fast_time)."""
    g = w.groups()[0]
    m = model or RefModel(spec, dtype, int(g.count), g.past + g.new)
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        m.forward(w, {})
        for _ in range(reps):
            m.forward(w, times)
    return {k: R.fast_time(v) for k, v in times.items()}
