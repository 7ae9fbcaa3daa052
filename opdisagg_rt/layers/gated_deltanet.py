"""Gated DeltaNet (Qwen3-Next linear attention) as `qkv_proj`, `attn`, `o_proj`.

Per value head, with q, k L2-normalised and q scaled by d_k^-0.5 (float32 state S: [d_k, d_v])::

    S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - k_t^T S_t))^T;  o_t = q_t^T S_t
    g_t = -exp(A_log) * softplus(a_t + dt_bias),  beta_t = sigmoid(b_t)

(transformers' Qwen3NextGatedDeltaNet). The layer splits like a softmax-attention layer
(DESIGN.md), so a stage spec places it the same:

  `layers.{i}.qkv_proj`  one GEMM over in_proj_qkvz and in_proj_ba, their head-grouped rows
                         reordered at load time to [q | k | v | z | b | a] so each part is one
                         slice (reads `hidden`, writes `qkv` (the conv input), `z`, `ba`)
  `layers.{i}.attn`      causal depthwise conv1d + SiLU, the gates, the gated delta rule, and
                         the gated RMSNorm of the output with z (reads `qkv, z, ba`, writes
                         `attn_out`); memory-bound: it streams one state per request per step
  `layers.{i}.o_proj`    out_proj added to the residual (the plain OProjOp)

State (the runner's StatePool, slot `batch.state_indices[r]` of request r): the conv state holds
the last kernel-1 conv *inputs* [conv_dim, kernel-1] (float32: exact for fp32/bf16 inputs), so a
prompt split anywhere by chunked prefill continues exactly; the recurrent state is float32
[HV, d_k, d_v]. Prefill rows run the chunked (WY) form from the slot's state, decode rows one
vectorized recurrent step for all of them. `_core` picks the implementation in one place: the
Triton kernels of `kernels/gated_delta_rule` on CUDA, torch on the CPU, where the decode rows'
conv and delta rule go to the C++ ops `ops.causal_conv1d_update` / `ops.gated_delta_rule_decode`,
in place on the pool's rows (the gather-update-scatter torch code is their reference and the
fallback).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdisagg_rt import ops
from opdisagg_rt.cache.state_pool import StateSpec
from opdisagg_rt.kernels import backend as kernel_backend
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.step_batch import StepBatch

L2_EPS = 1e-6  # transformers' / FLA's l2norm: x * rsqrt(sum(x^2) + 1e-6)
CHUNK = 64


# ---- weight layout --------------------------------------------------------------------------------

def split_in_proj(qkvz: torch.Tensor, ba: torch.Tensor, hk: int, hv: int, dk: int,
                  dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' head-grouped rows -> (q, k, v, z, b, a) row blocks, heads in order.

    in_proj_qkvz rows are grouped per key head g: [q_g (dk) | k_g (dk) | v_g (r*dv) | z_g (r*dv)]
    with r = hv // hk value heads per key head; in_proj_ba: [b_g (r) | a_g (r)]. Value head
    g*r + j is the j-th of group g (transformers' reshape order)."""
    r = hv // hk
    h = qkvz.shape[-1]
    g = qkvz.reshape(hk, 2 * dk + 2 * r * dv, h)
    q, k, v, z = g.split([dk, dk, r * dv, r * dv], dim=1)
    b, a = ba.reshape(hk, 2 * r, h).split([r, r], dim=1)
    return tuple(x.reshape(-1, h) for x in (q, k, v, z, b, a))


# ---- the core: torch (CPU) and Triton (CUDA) -------------------------------------------------------

def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def _prep_qk(q: torch.Tensor, k: torch.Tensor, hv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32, L2-normalised, q scaled, key heads repeated per value head."""
    q, k = l2norm(q.float()), l2norm(k.float())
    q = q * q.shape[-1] ** -0.5
    r = hv // q.shape[1]
    if r > 1:
        q, k = q.repeat_interleave(r, 1), k.repeat_interleave(r, 1)
    return q, k


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: q, k [N, HV, K] (prepared), v [N, HV, V], g, beta [N, HV] float32,
    state [N, HV, K, V] float32 -> (o [N, HV, V] float32, new state)."""
    s = state * g.exp()[..., None, None]
    delta = (v.float() - torch.einsum("nhk,nhkv->nhv", k, s)) * beta[..., None]
    s = s + k[..., None] * delta[..., None, :]
    return torch.einsum("nhk,nhkv->nhv", q, s), s


def chunk_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   state: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, chunked (WY) form: q, k [n, HV, K] (prepared), v [n, HV, V], g, beta [n, HV]
    float32, state [HV, K, V] float32 -> (o [n, HV, V] float32, final state).

    Per chunk (G = cumsum(g) in the chunk, Gam[i, j] = exp(G_i - G_j) for i >= j):
    T = (I + strict_lower((beta K) K^T Gam))^-1, W = T (beta K e^G), U = T (beta V); then
    V' = U - W S, O = (Q e^G) S + lower(Q K^T Gam) V', S = e^{G_last} S + (K e^{G_last - G})^T V'.
    Everything but the state recurrence runs for all chunks at once. Padded tail tokens have
    k = v = beta = g = 0, so they leave the state untouched."""
    n = q.shape[0]
    size = min(chunk, n)
    pad = -n % size
    nc = (n + pad) // size

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [n, HV, ...] -> [HV, nc, L, ...]
        x = x.float().movedim(0, 1)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(x.shape[0], nc, size, *x.shape[2:])

    q, k, v, g, beta = (blocks(x) for x in (q, k, v, g, beta))
    gc = g.cumsum(-1)  # [HV, nc, L]
    lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    gam = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kb = k * beta[..., None]
    a = ((kb @ k.transpose(-1, -2)) * gam).tril(-1)
    eye = torch.eye(size, device=q.device).expand_as(a)
    t_inv = torch.linalg.solve_triangular(eye + a, eye, upper=False, unitriangular=True)
    w = t_inv @ (kb * gc.exp()[..., None])
    u = t_inv @ (v * beta[..., None])
    attn = (q @ k.transpose(-1, -2)) * gam
    qg = q * gc.exp()[..., None]
    g_last = gc[..., -1:]  # [HV, nc, 1]
    kd = k * (g_last - gc).exp()[..., None]
    decay = g_last.exp()[..., None]  # [HV, nc, 1, 1]
    o = torch.empty_like(u)
    s = state.float()
    for c in range(nc):
        v_new = u[:, c] - w[:, c] @ s
        o[:, c] = qg[:, c] @ s + attn[:, c] @ v_new
        s = decay[:, c] * s + kd[:, c].transpose(-1, -2) @ v_new
    return o.reshape(o.shape[0], nc * size, -1)[:, :n].movedim(0, 1), s


def _core_torch(q, k, v, g, beta, state, slots, cu, num_decodes):
    hv = v.shape[1]
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    nd = num_decodes
    if nd:
        sd = slots[:nd]
        if ops.linear_attention_decode_supported(q, state):  # in place on the pool rows, q/k normalised inside
            ops.gated_delta_rule_decode(q[:nd], k[:nd], v[:nd], g[:nd], beta[:nd], state, sd,
                                        scale=q.shape[-1] ** -0.5, use_qk_l2norm=True, out=o[:nd])
        else:
            qd, kd = _prep_qk(q[:nd], k[:nd], hv)
            o[:nd], state[sd] = recurrent_step(qd, kd, v[:nd], g[:nd], beta[:nd], state[sd])
    bounds = cu.tolist()
    if len(bounds) - 1 > nd:
        lo0 = bounds[nd]
        qp, kp = _prep_qk(q[lo0:], k[lo0:], hv)
    for r in range(nd, len(bounds) - 1):
        lo, hi = bounds[r], bounds[r + 1]
        if hi > lo:
            s = int(slots[r])
            a, b = lo - lo0, hi - lo0
            o[lo:hi], state[s] = chunk_sequence(qp[a:b], kp[a:b], v[lo:hi], g[lo:hi], beta[lo:hi], state[s])
    return o


def _core_triton(q, k, v, g, beta, state, slots, cu, num_decodes):
    from opdisagg_rt import kernels
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    nd = num_decodes
    if nd:
        o[:nd] = kernels.fused_recurrent_gated_delta_rule(
            q[:nd], k[:nd], v[:nd], g[:nd], beta[:nd], state, state_indices=slots[:nd],
            use_qk_l2norm_in_kernel=True).float()
    if len(cu) - 1 > nd:
        lo = int(cu[nd])
        sp = slots[nd:]
        out, final = kernels.chunk_gated_delta_rule(
            q[lo:], k[lo:], v[lo:], g[lo:], beta[lo:], cu_seqlens=cu[nd:] - lo, initial_state=state[sp],
            output_final_state=True, use_qk_l2norm_in_kernel=True)
        o[lo:] = out.float()
        state[sp] = final
    return o


_CORES = {"torch": _core_torch, "triton": _core_triton}


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor, slots: torch.Tensor, cu: torch.Tensor, num_decodes: int,
                     backend: str | None = None) -> torch.Tensor:
    """Rows of request r are cu[r]:cu[r+1] and continue from state[slots[r]] (updated in place);
    the first `num_decodes` requests have one row each. q, k [T, HK, K] raw (normalised here),
    v [T, HV, V], g, beta [T, HV] float32. Returns o [T, HV, V] float32. `backend` ("torch" /
    "triton") overrides the per-device choice (tests run the Triton path interpreted on CPU)."""
    return _CORES[backend or kernel_backend.select(v)](q, k, v, g, beta, state, slots, cu, num_decodes)


# ---- the operations ---------------------------------------------------------------------------------

class GDNInProjOp(Op):
    """`layers.{i}.qkv_proj`: one GEMM -> `qkv` [T, 2*HK*K + HV*V] (conv input), `z` [T, HV*V],
    `ba` [T, 2*HV]."""

    def __init__(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
                 b: torch.Tensor, a: torch.Tensor):
        self.name = name
        self.sizes = (q.shape[0] + k.shape[0] + v.shape[0], z.shape[0], b.shape[0] + a.shape[0])
        self.proj = Linear(torch.cat([q, k, v, z, b, a], 0))
        self.reads, self.writes = ("hidden",), ("qkv", "z", "ba")

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"in_proj": self.proj.weight}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["qkv"], t["z"], t["ba"] = self.proj(t["hidden"]).split(self.sizes, dim=-1)


def _checked_bounds(batch: StepBatch) -> list[int]:
    slots = batch.state_indices
    if bool((slots < 0).any()):
        raise RuntimeError(f"requests {batch.request_ids} have state slots {slots.tolist()} (-1: none allocated)")
    return batch.query_start_loc.tolist()


class GatedDeltaNetOp(Op):
    """`layers.{i}.attn`: conv + gated delta rule + gated output norm, holding the state."""

    def __init__(self, name: str, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float):
        if num_v_heads % num_k_heads:
            raise ValueError(f"{name}: linear_num_value_heads={num_v_heads} is not a multiple of "
                             f"linear_num_key_heads={num_k_heads}")
        self.name = name
        self.hk, self.hv, self.dk, self.dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
        self.conv_dim = 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim
        if conv_weight.dim() != 2 or conv_weight.shape[0] != self.conv_dim or conv_weight.shape[1] < 1:
            raise ValueError(f"{name}: conv weight must be [{self.conv_dim}, kernel], got {list(conv_weight.shape)}")
        self.kernel = conv_weight.shape[1]
        self.conv_weight = conv_weight.float().contiguous()  # float32 conv: exact on the float32 state
        self.neg_A = -A_log.float().exp()
        self.dt_bias = dt_bias.float()
        self.norm_weight, self.eps = norm_weight, eps
        self.conv_state: torch.Tensor | None = None  # [slots, conv_dim, kernel - 1] float32
        self.recurrent_state: torch.Tensor | None = None  # [slots, HV, K, V] float32
        self.reads, self.writes = ("qkv", "z", "ba"), ("attn_out",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"conv1d": self.conv_weight, "neg_A": self.neg_A, "dt_bias": self.dt_bias, "norm": self.norm_weight}

    def state_spec(self) -> StateSpec:
        return StateSpec((self.conv_dim, self.kernel - 1), (self.hv, self.dk, self.dv))

    def bind_state(self, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        self.conv_state, self.recurrent_state = conv, recurrent

    def _conv(self, x: torch.Tensor, slots: torch.Tensor, cu: list[int], nd: int) -> torch.Tensor:
        """Causal depthwise conv + SiLU over each request's rows, continuing from (and updating)
        its conv state. x [T, C] -> float32 [T, C]."""
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        w = self.conv_weight
        if nd and ops.linear_attention_decode_supported(x, self.conv_state):  # in place on the pool rows
            ops.causal_conv1d_update(x[:nd], self.conv_state, w, slots[:nd], out=out[:nd])
        elif nd:  # all decode rows at once: window = [state | x_t]
            win = torch.cat([self.conv_state[slots[:nd]], x[:nd].float()[..., None]], -1)
            out[:nd] = (win * w).sum(-1)
            self.conv_state[slots[:nd]] = win[..., 1:]
        for r in range(nd, len(cu) - 1):
            lo, hi = cu[r], cu[r + 1]
            if hi == lo:
                continue
            s = int(slots[r])
            win = torch.cat([self.conv_state[s], x[lo:hi].float().T], -1)  # [C, kernel - 1 + n]
            out[lo:hi] = F.conv1d(win[None], w[:, None, :], groups=self.conv_dim)[0].T
            self.conv_state[s] = win[:, win.shape[1] - (self.kernel - 1):]
        return F.silu(out)

    def _gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """transformers' Qwen3NextRMSNormGated per value head: w * norm(o) (in o's dtype), times
        silu(z) in float32."""
        of = o.float()
        y = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)).to(o.dtype) * self.norm_weight
        return (y.float() * F.silu(z.float())).to(o.dtype)

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        if self.recurrent_state is None:
            raise RuntimeError(f"{self.name}: no state bound (the runner binds the state pool)")
        if batch.state_indices is None:
            raise RuntimeError(f"{self.name}: the step has no state_indices (linear-attention layer)")
        n, dtype = batch.num_tokens, t["qkv"].dtype
        slots, nd, cu = batch.state_indices, batch.num_decodes, batch.query_start_loc
        cu_list = batch.cached("gdn_cu_list", lambda: _checked_bounds(batch))  # once per step, not per layer
        x = self._conv(t["qkv"], slots, cu_list, nd).to(dtype)
        kd, vd = self.hk * self.dk, self.hv * self.dv
        q, k, v = x.split([kd, kd, vd], -1)
        q, k, v = q.reshape(n, self.hk, self.dk), k.reshape(n, self.hk, self.dk), v.reshape(n, self.hv, self.dv)
        b, a = t["ba"].split(self.hv, -1)
        beta = torch.sigmoid(b).float()
        g = self.neg_A * F.softplus(a.float() + self.dt_bias)
        o = gated_delta_rule(q, k, v, g, beta, self.recurrent_state, slots, cu, nd).to(dtype)
        out = self._gated_norm(o, t["z"].reshape(n, self.hv, self.dv))
        t["attn_out"] = out.reshape(n, vd)
