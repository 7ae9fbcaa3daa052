"""Run a ModelSpec's operations with the reference torch code on this CPU and time each one.

A whole forward pass runs layer after layer (random weights, random KV/state contents), so each
operation meets the cache state it has in a real step: a model larger than the last-level cache
streams its weights and KV from DRAM. Times are medians over repetitions, per operation name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdisagg_rt.analysis import reference as R
from opdisagg_rt.analysis.models import ModelSpec
from opdisagg_rt.analysis.workload import Workload

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _w(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype).normal_(0, 0.02)


class RefModel:
    """Weights and caches of `spec` for batch B at up to `max_len` tokens."""

    def __init__(self, spec: ModelSpec, dtype: str, batch: int, max_len: int):
        self.s, self.dt, self.B, self.L = spec, DTYPES[dtype], batch, max_len
        s, dt, h = spec, self.dt, spec.hidden_size
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


def measure(spec: ModelSpec, w: Workload, dtype: str = "bf16", reps: int = 5, model: RefModel | None = None) -> dict[str, float]:
    """Seconds per operation name over `reps` forwards after one warm-up (reference.low_median)."""
    g = w.groups()[0]
    m = model or RefModel(spec, dtype, int(g.count), g.past + g.new)
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        m.forward(w, {})
        for _ in range(reps):
            m.forward(w, times)
    return {k: R.low_median(v) for k, v in times.items()}
