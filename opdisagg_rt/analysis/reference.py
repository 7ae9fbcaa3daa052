"""Plain-torch implementations of each operation kind, timed by calibrate.py and validate.py.

They are what a straightforward CPU engine runs (fused QKV weight, KV cache per layer as
[batch, kv_heads, max_len, head_dim], chunked linear attention with a triangular solve), so
measuring them tests the cost model's counts and the fitted efficiencies, not a mock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()  # HF-style: statistics in fp32 whatever the storage dtype
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def gated_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    g, u = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w_down)


def moe(x: torch.Tensor, w_router: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Token-choice top-k routing; loops over the experts that received tokens (as HF and
    simple CPU engines do). w_gate_up: [E, 2I, h], w_down: [E, h, I]."""
    probs = F.linear(x, w_router).float().softmax(-1)
    weight, idx = probs.topk(top_k, dim=-1)
    weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x) if shared is None else gated_mlp(x, *shared)
    flat = idx.flatten()
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=w_router.shape[0]).tolist()
    tok = order // top_k
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = tok[start:start + n]
        y = gated_mlp(x[sel], w_gate_up[e], w_down[e]) * weight.flatten()[order[start:start + n], None]
        out.index_add_(0, sel, y)
        start += n
    return out


def attn_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pos: int, window: int | None) -> torch.Tensor:
    """One new token per sequence. q: [B, H, d]; caches [B, Hkv, Lmax, d]; k, v: [B, Hkv, d].
    GQA as a grouped matmul so each KV head is read once for all its query heads."""
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    lo = 0 if window is None else max(0, pos + 1 - window)
    B, H, d = q.shape
    Hkv = k_cache.shape[1]
    kk, vv = k_cache[:, :, lo:pos + 1], v_cache[:, :, lo:pos + 1]
    s = torch.matmul(q.view(B, Hkv, H // Hkv, d), kk.transpose(-1, -2)) * d ** -0.5
    p = s.float().softmax(-1).to(q.dtype)
    return torch.matmul(p, vv).reshape(B, H * d)


def attn_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whole prompts, no prefix. q: [B, H, n, d]; k, v: [B, Hkv, n, d]."""
    n = q.shape[2]
    if window is None or window >= n:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        i = torch.arange(n)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2).reshape(q.shape[0], n, -1)


def gdn_decode(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet recurrent step. q, k: [B, Hv, dk]; v: [B, Hv, dv]; g (log decay), beta: [B, Hv];
    state: [B, Hv, dk, dv] fp32, updated in place."""
    q, k, v = q.float(), k.float(), v.float()
    state.mul_(g.float().exp()[..., None, None])
    kv = torch.einsum("bhk,bhkv->bhv", k, state)
    delta = (v - kv) * beta.float()[..., None]
    state.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q, state)


def gdn_chunked(q, k, v, g, beta, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet over a whole prompt in chunks (WY representation, triangular solve).
    q, k: [B, Hv, n, dk]; v: [B, Hv, n, dv]; g, beta: [B, Hv, n]. Returns (out, final state)."""
    B, H, n, dk = k.shape
    dv = v.shape[-1]
    pad = (-n) % chunk
    q, k, v, g, beta = (F.pad(t.float(), (0, 0, 0, pad) if t.dim() == 4 else (0, pad)) for t in (q, k, v, g, beta))
    nc = (n + pad) // chunk
    q, k, v = (t.view(B, H, nc, chunk, -1) for t in (q, k, v))
    g, beta = g.view(B, H, nc, chunk).cumsum(-1), beta.view(B, H, nc, chunk)
    decay = (g[..., :, None] - g[..., None, :]).tril().exp().tril()
    kb = k * beta[..., None]
    a = (kb @ k.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(chunk).expand_as(a)
    t_inv = torch.linalg.solve_triangular(eye + a, eye, upper=False)  # (I + A)^-1
    u = t_inv @ (v * beta[..., None])
    w = t_inv @ (kb * g.exp()[..., None])
    state = q.new_zeros(B, H, dk, dv)
    out = torch.empty_like(v)
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    for c in range(nc):
        qc, kc, gc = q[:, :, c], k[:, :, c], g[:, :, c]
        vn = u[:, :, c] - w[:, :, c] @ state
        att = (qc @ kc.transpose(-1, -2) * decay[:, :, c]).masked_fill(~causal, 0)
        out[:, :, c] = (qc * gc.exp()[..., None]) @ state + att @ vn
        state = state * gc[..., -1:, None].exp() + (kc * (gc[..., -1:] - gc).exp()[..., None]).transpose(-1, -2) @ vn
    return out.view(B, H, nc * chunk, dv)[:, :, :n], state


def causal_conv_step(x: torch.Tensor, conv_state: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Short causal conv of GDN, one token. x: [B, C]; conv_state: [B, C, K]; w: [C, K]."""
    conv_state.copy_(torch.roll(conv_state, -1, dims=-1))
    conv_state[:, :, -1] = x
    return F.silu((conv_state * w).sum(-1))


def causal_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: [B, n, C]; w: [C, K] depthwise causal conv over the prompt."""
    K = w.shape[1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w[:, None, :], groups=w.shape[0])
    return F.silu(y).transpose(1, 2)


def lightning_decode(q, k, v, decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Decayed linear attention step (MiniMax Lightning). q, k, v: [B, H, d]; decay: [H]; state [B, H, d, d] fp32."""
    state.mul_(decay[None, :, None, None]).add_(k.float()[..., :, None] * v.float()[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q.float(), state)


def lightning_chunked(q, k, v, decay: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Lightning prefill: intra-chunk masked attention with decay + inter-chunk through the state."""
    B, H, n, d = q.shape
    pad = (-n) % chunk
    q, k, v = (F.pad(t.float(), (0, 0, 0, pad)).view(B, H, -1, chunk, d) for t in (q, k, v))
    nc = q.shape[2]
    i = torch.arange(chunk, dtype=torch.float32)
    ld = decay.float().log()[:, None]  # [H, 1]
    m = ((i[:, None] - i[None, :]) * ld[..., None]).exp() * (i[:, None] >= i[None, :])  # [H, C, C]
    qd, kd = (i[None, :] + 1) * ld, (chunk - 1 - i[None, :]) * ld
    state = q.new_zeros(B, H, d, d)
    out = torch.empty_like(v)
    for c in range(nc):
        qc, kc, vc = q[:, :, c], k[:, :, c], v[:, :, c]
        out[:, :, c] = ((qc @ kc.transpose(-1, -2)) * m) @ vc + (qc * qd.exp()[..., None]) @ state
        state = state * (chunk * ld).exp()[..., None] + (kc * kd.exp()[..., None]).transpose(-1, -2) @ vc
    return out.view(B, H, -1, d)[:, :, :n]


@dataclass(slots=True)
class Timer:
    """CPU time of this thread (time.thread_time): with one intra-op thread it equals wall time on an
    idle machine, and other processes on this shared 2-core box cannot inflate it by preempting us."""
    total: float = 0.0
    _t: float = 0.0

    def __enter__(self):
        self._t = time.thread_time()
        return self

    def __exit__(self, *exc):
        self.total += time.thread_time() - self._t


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def fast_time(xs: list[float]) -> float:
    """The fastest repetition: other processes only ever add time (kept for raw diagnostics)."""
    return min(xs)


def speed_time(ratios: list[float], probe_ref: float) -> float:
    """An operation's time on this shared machine, from its repetitions' times divided by a speed
    probe's time measured next to each (runner.SpeedProbe): the median ratio times the probe's
    undisturbed time. Other processes and the host slow the whole machine down by up to 2x for
    seconds at a time; the ratio cancels that, the median drops what it does not cancel.
    Calibration and validation both use it, so both measure the same quantity."""
    return median(ratios) * probe_ref
