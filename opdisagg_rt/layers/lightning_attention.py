"""MiniMax Lightning attention (decayed linear attention) as `qkv_proj`, `attn`, `o_proj`.

Per head h with slope s_h, for each token t (float32 state S: [d_k, d_v])::

    S_t = exp(-s_h) S_{t-1} + k_t^T v_t,        o_t = q_t S_t

with q, k, v = silu(x W_qkv) and no softmax scale (transformers' MiniMaxLightningAttention).
The layer splits like a softmax-attention layer (DESIGN.md), so a stage spec places it the same:

  `layers.{i}.qkv_proj`  one GEMM over [q; k; v; output gate] rows: q, k, v = silu(.) and the
                         gate logits (reads `hidden`, writes `q, k, v, gate`)
  `layers.{i}.attn`      the recurrence over this step's rows, continuing from each request's
                         state slot (reads `q, k, v`, writes `attn_out`); memory-bound: it
                         streams one [H, d_k, d_v] state per request per step
  `layers.{i}.o_proj`    RMSNorm over all heads (eps 1e-6), times sigmoid(gate), out_proj, then the
                         MiniMax residual: alpha * hidden + beta * out
                         (reads `attn_out, gate, hidden`, writes `residual`)

The gate and the norm stay with the projections so they never cross to the attention stage.

State: one float32 [H, d_k, d_v] per request in the runner's StatePool (no convolution state);
row r of a step uses slot `batch.state_indices[r]`. Prefill rows run the chunked form from the
slot's state (exact for any split of a prompt, so chunked prefill may cut anywhere, including
inside a chunk); decode rows (one token each) run one recurrent update for the whole batch.
`lightning_attention` picks the implementation once per call: the Triton kernels of
`kernels/lightning_attn` on CUDA, torch on the CPU, where the decode rows go to the C++ op
`ops.lightning_attention_decode`, which updates the pool's rows in place (one read and one write
of each state; `recurrent_step`, gather-update-scatter, is its reference and the fallback).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from opdisagg_rt import ops
from opdisagg_rt.cache.state_pool import StateSpec
from opdisagg_rt.kernels import backend as kernel_backend
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.step_batch import StepBatch

OUTPUT_NORM_EPS = 1e-6  # transformers builds the output norm with its default eps, not the config's
TRITON_CHUNK = 64  # the Triton chunk kernel keeps a [chunk, chunk] tile in registers


def minimax_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates of layer `layer_idx`: ALiBi-like geometric rates 2^(-8(h+1)/H),
    scaled down linearly with depth (the last layer barely decays)."""
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads, dtype=torch.float32) + 1)
    return rate * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)


@dataclass(frozen=True)
class DecayTables:
    """The chunked form's decays for one layer (full-chunk tables; a partial chunk of L tokens
    uses the leading L x L block and the last L key decays)."""
    slope: torch.Tensor        # [H] float32
    chunk_size: int
    step: torch.Tensor         # [H, 1, 1]     exp(-s): one token's decay (recurrent form)
    query: torch.Tensor        # [H, C, 1]     exp(-s (i + 1))
    key: torch.Tensor          # [H, C, 1]     exp(-s (C - 1 - j))
    diag: torch.Tensor         # [H, C, C]     exp(-s (i - j)) for i >= j, else 0

    @classmethod
    def build(cls, slope: torch.Tensor, chunk_size: int) -> DecayTables:
        if chunk_size < 1:
            raise ValueError(f"lightning attention chunk_size must be >= 1, got {chunk_size}")
        s = slope.float().view(-1, 1, 1)
        i = torch.arange(chunk_size, dtype=torch.float32)
        diff = i[:, None] - i[None, :]
        diag = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), torch.zeros(()))
        return cls(slope.float().contiguous(), chunk_size, torch.exp(-s), torch.exp(-s * (i[:, None] + 1)),
                   torch.exp(-s * (chunk_size - 1 - i)[:, None]), diag)


# ---- the core: one backend choice -----------------------------------------------------------------

def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: DecayTables,
                        state: torch.Tensor, state_indices: torch.Tensor, query_start_loc: torch.Tensor,
                        num_decodes: int, backend: kernel_backend.Backend | None = None) -> torch.Tensor:
    """Lightning attention over a step's rows, updating the state pool in place.

    q, k: [T, H, d_k]; v: [T, H, d_v] (rows of request r: query_start_loc[r]:query_start_loc[r+1];
    the first `num_decodes` requests have one row each). state: float32 [slots, H, d_k, d_v];
    state_indices: int64 [R], all >= 0. Returns [T, H, d_v] in v's dtype. `backend` overrides the
    per-device choice (tests).
    """
    if state_indices.numel() != query_start_loc.numel() - 1:
        raise ValueError(f"lightning attention: {state_indices.numel()} state indices for "
                         f"{query_start_loc.numel() - 1} requests")
    if state_indices.numel() and int(state_indices.min()) < 0:
        raise ValueError(f"lightning attention: a request has no state slot (state_indices={state_indices.tolist()})")
    if (backend or kernel_backend.select(q)) == "triton":
        return _triton_forward(q, k, v, decay, state, state_indices, query_start_loc, num_decodes)
    return _torch_forward(q, k, v, decay, state, state_indices, query_start_loc, num_decodes)


def _triton_forward(q, k, v, decay, state, state_indices, query_start_loc, num_decodes):
    from opdisagg_rt.kernels.lightning_attn import chunk_lightning_attn, fused_recurrent_lightning_attn
    out = torch.empty(q.shape[0], v.shape[1], v.shape[2], dtype=v.dtype, device=v.device)
    slope = decay.slope.to(q.device)
    if num_decodes:
        fused_recurrent_lightning_attn(q[:num_decodes], k[:num_decodes], v[:num_decodes], slope, state,
                                       state_indices=state_indices[:num_decodes], out=out[:num_decodes])
    if state_indices.numel() > num_decodes:
        first = int(query_start_loc[num_decodes])
        cu = query_start_loc[num_decodes:] - first
        idx = state_indices[num_decodes:]
        o, final = chunk_lightning_attn(q[first:], k[first:], v[first:], slope, cu_seqlens=cu,
                                        initial_state=state.index_select(0, idx), output_final_state=True,
                                        chunk_size=TRITON_CHUNK)
        out[first:] = o
        state.index_copy_(0, idx, final)
    return out


def _torch_forward(q, k, v, decay, state, state_indices, query_start_loc, num_decodes):
    # Float32 results are rounded once, on assignment into out (v's dtype).
    out = torch.empty(q.shape[0], v.shape[1], v.shape[2], dtype=v.dtype)
    nd = num_decodes
    if nd:
        idx = state_indices[:nd]
        if ops.linear_attention_decode_supported(q, state):  # in place on the pool rows
            ops.lightning_attention_decode(q[:nd], k[:nd], v[:nd], state, idx, decay.step.view(-1), out=out[:nd])
        else:
            out[:nd] = recurrent_step(q[:nd], k[:nd], v[:nd], decay, state, idx)
    bounds = query_start_loc.tolist()
    for r in range(nd, len(bounds) - 1):
        a, b = bounds[r], bounds[r + 1]
        slot = int(state_indices[r])
        out[a:b], state[slot] = chunked_prefill(q[a:b], k[a:b], v[a:b], decay, state[slot])
    return out



def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: DecayTables,
                   state: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One token for each of N requests at once: q, k [N, H, d_k], v [N, H, d_v]; the N states
    `state[idx]` are updated in place. Returns float32 [N, H, d_v]."""
    s = state.index_select(0, idx)
    s.mul_(decay.step).add_(k.float()[..., :, None] * v.float()[..., None, :])
    state.index_copy_(0, idx, s)
    return torch.einsum("nhk,nhkv->nhv", q.float(), s)


def chunked_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: DecayTables,
                    s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's L rows from state s0 [H, d_k, d_v]: per chunk, the causal decayed intra-chunk
    part plus the carried state's contribution. Returns (float32 [L, H, d_v], final state)."""
    qh, kh, vh = (x.float().transpose(0, 1) for x in (q, k, v))  # [H, L, d]
    n, c = qh.shape[1], decay.chunk_size
    s = s0.float()
    out = torch.empty(qh.shape[0], n, vh.shape[2])
    for c0 in range(0, n, c):
        m = min(c, n - c0)
        qc, kc, vc = qh[:, c0:c0 + m], kh[:, c0:c0 + m], vh[:, c0:c0 + m]
        intra = (qc @ kc.transpose(1, 2) * decay.diag[:, :m, :m]) @ vc
        out[:, c0:c0 + m] = torch.baddbmm(intra, qc * decay.query[:, :m], s)
        block = torch.exp(-decay.slope * m).view(-1, 1, 1)
        s = torch.baddbmm(s * block, (kc * decay.key[:, c - m:]).transpose(1, 2), vc)
    return out.transpose(0, 1), s


# ---- the operations ---------------------------------------------------------------------------------

class LightningQKVProjOp(Op):
    """`layers.{i}.qkv_proj`: q, k, v = silu(x W) and gate = x W_gate (logits, as Qwen3-Next's
    gated attention writes them), one GEMM.

    qkv: transformers' fused weight [H * 3 * d, hidden] (per head: q rows, k rows, v rows);
    gate: output_gate [H * d, hidden]."""

    def __init__(self, name: str, qkv: torch.Tensor, gate: torch.Tensor, num_heads: int, head_dim: int):
        hidden = qkv.shape[1]
        width = num_heads * head_dim
        if tuple(qkv.shape) != (3 * width, hidden) or tuple(gate.shape) != (width, hidden):
            raise ValueError(f"{name}: qkv {list(qkv.shape)} / gate {list(gate.shape)} do not match "
                             f"{num_heads} heads of {head_dim}")
        self.name, self.width = name, width
        # Regroup the per-head interleaved rows into [q | k | v] so each output is one column block.
        qkv = qkv.view(num_heads, 3, head_dim, hidden).transpose(0, 1).reshape(3 * self.width, hidden)
        self.proj = Linear(torch.cat([qkv, gate], 0))
        self.reads, self.writes = ("hidden",), ("q", "k", "v", "gate")

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"qkv_gate": self.proj.weight}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        y = self.proj(t["hidden"])
        qkv = torch.nn.functional.silu(y[:, :3 * self.width])
        t["q"], t["k"], t["v"] = qkv.split(self.width, dim=-1)
        t["gate"] = y[:, 3 * self.width:]


class LightningAttentionOp(Op):
    """`layers.{i}.attn`: decayed linear attention with a per-request float32 state (StatePool)."""

    def __init__(self, name: str, num_heads: int, head_dim: int, slope: torch.Tensor, chunk_size: int):
        if tuple(slope.shape) != (num_heads,):
            raise ValueError(f"{name}: slope must have shape [{num_heads}], got {list(slope.shape)}")
        self.name, self.num_heads, self.head_dim = name, num_heads, head_dim
        self.decay = DecayTables.build(slope, chunk_size)
        self.state: torch.Tensor | None = None
        self.reads, self.writes = ("q", "k", "v"), ("attn_out",)

    def state_spec(self) -> StateSpec:
        return StateSpec(conv_shape=(0,), recurrent_shape=(self.num_heads, self.head_dim, self.head_dim))

    def bind_state(self, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        want = (self.num_heads, self.head_dim, self.head_dim)
        if tuple(recurrent.shape[1:]) != want or recurrent.dtype != torch.float32:
            raise ValueError(f"{self.name}: recurrent state must be float32 [slots, {', '.join(map(str, want))}], "
                             f"got {recurrent.dtype} {list(recurrent.shape)}")
        self.state = recurrent

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"slope": self.decay.slope}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        if self.state is None or batch.state_indices is None:
            raise RuntimeError(f"{self.name}: no state pool bound (the runner binds it in allocate_kv_cache)")
        n, h, d = batch.num_tokens, self.num_heads, self.head_dim
        q, k, v = (t[x].view(n, h, d) for x in ("q", "k", "v"))
        out = lightning_attention(q, k, v, self.decay, self.state, batch.state_indices, batch.query_start_loc,
                                  batch.num_decodes)
        t["attn_out"] = out.view(n, h * d)


class LightningOProjOp(Op):
    """`layers.{i}.o_proj`: residual = alpha * hidden + beta * out_proj(norm(attn_out) * sigmoid(gate))."""

    def __init__(self, name: str, weight: torch.Tensor, norm: torch.Tensor, alpha: float = 1.0, beta: float = 1.0):
        self.name, self.norm, self.alpha, self.beta = name, norm, float(alpha), float(beta)
        self.proj = Linear(weight)
        self.reads, self.writes = ("attn_out", "gate", "hidden"), ("residual",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"o": self.proj.weight, "norm": self.norm}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        y = self.proj(ops.rms_norm(t["attn_out"], self.norm, OUTPUT_NORM_EPS) * torch.sigmoid(t["gate"]))
        t["residual"] = scaled_residual(t["hidden"], y, self.alpha, self.beta)


def scaled_residual(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * x + beta * y (MiniMax's residual scalings; plain x + y when both are 1)."""
    if alpha == 1.0 and beta == 1.0:
        return x + y
    return x * alpha + y * beta
