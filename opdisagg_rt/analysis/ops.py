"""FLOPs, bytes and parameters of every named operation of one engine step.

Counting rules (docs/analysis.md has the formulas): a multiply-add is 2 FLOPs; bytes are the
compulsory traffic of a fused kernel: weights once, KV cache / recurrent state read and written
once per sequence (GQA: once per KV head, not per query head), activations in and out.
Softmax, RoPE and activation-function FLOPs are left out: they are < 1% of every op counted here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from opdisagg_rt.analysis.models import LayerSpec, ModelSpec
from opdisagg_rt.analysis.workload import SeqGroup, Workload

LIN_CHUNK = 64  # chunk length of the chunked linear-attention prefill kernels (fla, Lightning)


@dataclass(slots=True)
class OpCost:
    op: str
    kind: str  # gemm | attn | linear_attn | norm | embed | moe | comm
    flops: float = 0.0
    weight_bytes: float = 0.0  # parameters read
    state_bytes: float = 0.0  # KV cache / recurrent state read + written
    act_bytes: float = 0.0  # activations read + written
    params: float = 0.0  # parameters stored by this op (all experts)
    active_params: float = 0.0  # parameters used per token
    gemms: list[tuple[float, int, int, float]] = field(default_factory=list)  # (M, K, N, count) decomposition
    state_resident: float = 0.0  # KV / state bytes kept between steps (memory capacity)
    attn_kind: str | None = None
    decode: bool = False  # attention cores: every sequence adds one token (a different kernel on CPU)
    # shape counts that FLOPs and bytes hide, used by the measured CPU profile (hardware.CpuProfile):
    rows: float = 0.0  # tokens (rows) through the op
    seqs: float = 0.0  # sequences in the step (per-sequence work of attention and recurrent state)
    scores: float = 0.0  # attention score elements (heads x query-key pairs): softmax work, not FLOPs
    steps: float = 0.0  # sequential steps: chunks of a chunked linear-attention prefill, 1 for a recurrent step
    ew_elems: float = 0.0  # elements of element-wise work fused into the op (residual add, SiLU-and-mul, routing)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.state_bytes + self.act_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


def _pairs(past: int, new: int, window: int | None) -> float:
    """Query-key pairs of causal attention for `new` queries after `past` cached tokens."""
    def f(x: int) -> float:  # sum_{j=1..x} min(j, window)
        if window is None or x <= window:
            return x * (x + 1) / 2
        return window * (window + 1) / 2 + (x - window) * window
    return f(past + new) - f(past)


def _chunks(g: SeqGroup, chunk: int) -> list[tuple[int, int]]:
    """(past, new) of each prefill chunk of one sequence."""
    if chunk <= 0 or g.new <= chunk:
        return [(g.past, g.new)]
    return [(g.past + s, min(chunk, g.new - s)) for s in range(0, g.new, chunk)]


def _gemm(name: str, T: float, K: int, N: int, b: int, params_extra: float = 0.0, extra_act: float = 0.0) -> OpCost:
    p = K * N + params_extra
    return OpCost(name, "gemm", flops=2 * T * K * N, weight_bytes=p * b, act_bytes=(T * (K + N) + extra_act) * b,
                  params=p, active_params=p, gemms=[(T, K, N, 1)], rows=T, ew_elems=extra_act)


def _qkv_out(m: ModelSpec, l: LayerSpec) -> tuple[int, int, float]:
    """(input width, output width, extra params) of layers.i.qkv_proj; o_proj input width after."""
    h = m.hidden_size
    if l.attn in ("full", "sliding"):
        out = m.q_dim * (2 if m.attn_output_gate else 1) + 2 * m.kv_dim
        extra = (m.q_dim + 2 * m.kv_dim) * m.attn_bias + 2 * m.head_dim * m.qk_norm
        return h, out, extra
    if l.attn == "gdn":  # in_proj_qkvz + in_proj_ba (beta, decay gate per value head)
        return h, 2 * m.lin_k_heads * m.lin_k_dim + 2 * m.lin_v_heads * m.lin_v_dim + 2 * m.lin_v_heads, 0
    if l.attn == "lightning":  # qkv + output gate, all from the normed hidden state
        return h, 4 * m.lin_v_heads * m.lin_v_dim, 0
    raise AssertionError(l.attn)


def _attn_out_dim(m: ModelSpec, l: LayerSpec) -> int:
    if l.attn == "mla":
        return m.num_heads * m.v_head_dim
    if l.attn in ("gdn", "lightning"):
        return m.lin_v_heads * m.lin_v_dim
    return m.q_dim


def _mla_qkv(m: ModelSpec, name: str, T: float, b: int) -> OpCost:
    h, H = m.hidden_size, m.num_heads
    qk = m.qk_nope_dim + m.qk_rope_dim
    mats = [(h, m.kv_lora_rank + m.qk_rope_dim)]  # kv_a (latent + shared rope key)
    mats += [(h, m.q_lora_rank), (m.q_lora_rank, H * qk)] if m.q_lora_rank else [(h, H * qk)]
    p = sum(k * n for k, n in mats) + m.kv_lora_rank + m.q_lora_rank  # + latent norms
    out = m.kv_lora_rank + m.qk_rope_dim + H * qk
    return OpCost(name, "gemm", flops=sum(2 * T * k * n for k, n in mats), weight_bytes=p * b,
                  act_bytes=T * (h + out) * b, params=p, active_params=p, gemms=[(T, k, n, 1) for k, n in mats], rows=T)


def _attn(m: ModelSpec, l: LayerSpec, name: str, w: Workload, b: int, state_b: int) -> OpCost:
    c = OpCost(name, "attn", attn_kind=l.attn, decode=all(g.new == 1 for g in w.groups()),
               rows=w.tokens, seqs=sum(g.count for g in w.groups()))
    if l.attn in ("full", "sliding"):
        H, Hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
        c.params = c.active_params = H * m.sinks
        kv_tok = 2 * Hkv * d * b  # K and V of one token, all KV heads
        for g in w.groups():
            for past, new in _chunks(g, w.chunk if w.phase == "prefill" else 0):
                old = past if l.window is None else min(past, l.window - 1)  # cached keys the chunk can see
                c.flops += g.count * 4 * H * d * _pairs(past, new, l.window)
                c.scores += g.count * H * _pairs(past, new, l.window)
                c.state_bytes += g.count * (old + new) * kv_tok  # read visible cache once, write new K/V
                c.act_bytes += g.count * new * (2 * H * d * b + kv_tok)  # q, k, v in; out
            c.state_resident += g.count * min(g.past + g.new, l.window or 1 << 62) * kv_tok
        return c
    if l.attn == "mla":
        return _mla_attn(m, c, w, b)
    # linear attention: per value head a dk x dv state (fp32 in every public kernel)
    c.kind = "linear_attn"
    Hv, dk, dv = m.lin_v_heads, m.lin_k_dim, m.lin_v_dim
    gdn = l.attn == "gdn"
    state = Hv * dk * dv * state_b
    conv_dim = (2 * m.lin_k_heads * dk + Hv * dv) if gdn else 0
    if gdn:
        c.params = c.active_params = conv_dim * m.lin_conv + 2 * Hv + dv  # conv, A_log, dt_bias, norm
    else:
        c.params = c.active_params = Hv * dv  # output norm
    in_w = (2 * m.lin_k_heads * dk + 2 * Hv * dv + 2 * Hv) if gdn else 3 * Hv * dv  # q,k,v(,z,beta,g) in
    c.steps = max(1 if g.new == 1 else math.ceil(g.new / LIN_CHUNK) for g in w.groups())
    for g in w.groups():
        if g.new == 1:  # recurrent step: decay, retrieve S^T k, rank-1 update (GDN); decay + outer (Lightning); read q^T S
            per_head = 7 * dk * dv if gdn else 5 * dk * dv
            c.flops += g.count * (Hv * per_head + 2 * conv_dim * m.lin_conv)
            c.state_bytes += g.count * (2 * state + 2 * conv_dim * (m.lin_conv - 1) * b)
        else:  # chunked form, C = LIN_CHUNK: intra-chunk attention, inter-chunk q S and state update
            C, n = LIN_CHUNK, g.new
            nc = math.ceil(n / C)
            per_head = n * (2 * C * (dk + dv) + 4 * dk * dv) + nc * dk * dv
            if gdn:  # WY form: K K^T, triangular solve, W = T K, U = T V, W S
                per_head += n * (4 * C * dk + 2 * C * dv + 2 * dk * dv + C * C / 3)
            c.flops += g.count * (Hv * per_head + 2 * conv_dim * m.lin_conv * n)
            c.state_bytes += g.count * (state * (2 if g.past else 1) + 2 * conv_dim * (m.lin_conv - 1) * b)
        c.act_bytes += g.count * g.new * (in_w + Hv * dv) * b
        c.state_resident += g.count * (state + conv_dim * (m.lin_conv - 1) * b)
    return c


def _mla_attn(m: ModelSpec, c: OpCost, w: Workload, b: int) -> OpCost:
    """MLA core incl. kv_b (the latent up-projection). Decode absorbs kv_b into q and the output
    (attention runs in the 512-wide latent space, cache shared by all heads); prefill decompresses."""
    H, r, rope, nope, vd = m.num_heads, m.kv_lora_rank, m.qk_rope_dim, m.qk_nope_dim, m.v_head_dim
    kv_b = r * H * (nope + vd)
    c.params = c.active_params = kv_b
    c.weight_bytes = kv_b * b
    tok = (r + rope) * b  # cached latent + rope key per token
    for g in w.groups():
        for past, new in _chunks(g, w.chunk if w.phase == "prefill" else 0):
            keys = past + new
            if new == 1:
                c.flops += g.count * (2 * H * nope * r + 2 * H * (2 * r + rope) * keys + 2 * H * r * vd)
            else:
                c.flops += g.count * (2 * keys * kv_b + 2 * H * (nope + rope + vd) * _pairs(past, new, None))
            c.scores += g.count * H * _pairs(past, new, None)
            c.state_bytes += g.count * keys * tok
            c.act_bytes += g.count * new * (H * (nope + rope) + r + rope + H * vd) * b
        c.state_resident += g.count * (g.past + g.new) * tok
    return c


def _ffn(m: ModelSpec, l: LayerSpec, name: str, w: Workload, T: float, b: int) -> OpCost:
    h = m.hidden_size
    resid = 2 * T * h  # the residual add is fused here: read and write the residual stream
    if not l.moe:
        c = _gemm(name, T, h, 3 * m.intermediate_size, b, extra_act=resid)
        c.kind, c.gemms = "gemm", [(T, h, 2 * m.intermediate_size, 1), (T, m.intermediate_size, h, 1)]
        c.act_bytes = (T * 2 * h + resid) * b
        c.ew_elems = T * (h + m.intermediate_size)  # residual add, SiLU-and-mul
        return c
    E, k, I = m.num_experts, m.top_k, m.expert_size
    expert_p = 3 * h * I + (2 * I + h) * m.expert_bias
    router_p = h * E + E * m.expert_bias
    shared_p = 3 * h * m.shared_size + h * m.shared_gate
    touched = E * (1 - (1 - k / E) ** T)  # expected distinct experts hit by T tokens routed top-k
    c = OpCost(name, "moe", rows=T, ew_elems=T * (h + E + k * I + m.shared_size))  # residual, routing, SiLU-and-mul
    c.params = router_p + E * expert_p + shared_p
    c.active_params = router_p + k * expert_p + shared_p
    c.flops = 2 * T * (h * E + k * 3 * h * I + 3 * h * m.shared_size)
    c.weight_bytes = (router_p + touched * expert_p + shared_p) * b
    c.act_bytes = (T * 2 * h + resid) * b
    m_e = T * k / touched  # tokens per touched expert
    c.gemms = [(T, h, E, 1), (m_e, h, 2 * I, touched), (m_e, I, h, touched)]
    if m.shared_size:
        c.gemms += [(T, h, 2 * m.shared_size, 1), (T, m.shared_size, h, 1)]
    return c


def _norm(name: str, rows: float, h: int, b: int) -> OpCost:
    return OpCost(name, "norm", flops=4 * rows * h, weight_bytes=h * b, act_bytes=2 * rows * h * b, params=h, active_params=h,
                  rows=rows)


def model_ops(m: ModelSpec, w: Workload, dtype_bytes: int = 2, state_bytes: int = 4) -> list[OpCost]:
    """Costs of every named operation for one step of workload `w` (dtype_bytes: weights, activations, KV)."""
    b, h, T, V = dtype_bytes, m.hidden_size, w.tokens, m.vocab_size
    ops = [OpCost("embed", "embed", act_bytes=2 * T * h * b, params=V * h, active_params=0, rows=T)]
    for i, l in enumerate(m.layers):
        p = f"layers.{i}."
        ops.append(_norm(p + "attn_norm", T, h, b))
        if l.attn == "mla":
            ops.append(_mla_qkv(m, p + "qkv_proj", T, b))
        else:
            k, n, extra = _qkv_out(m, l)
            ops.append(_gemm(p + "qkv_proj", T, k, n, b, params_extra=extra))
        ops.append(_attn(m, l, p + "attn", w, b, state_bytes))
        od = _attn_out_dim(m, l)
        ops.append(_gemm(p + "o_proj", T, od, h, b, params_extra=h * m.attn_bias, extra_act=T * h))  # + residual in
        ops.append(_norm(p + "mlp_norm", T, h, b))
        ops.append(_ffn(m, l, p + ("moe" if l.moe else "mlp"), w, T, b))
    R = w.logit_rows
    ops.append(_norm("final_norm", R, h, b))
    head = _gemm("lm_head", R, h, V, b)
    if m.tie_embeddings:  # weights shared with embed: stored once, counted under embed
        head.params = 0
    head.active_params = V * h
    ops.append(head)
    return ops


def count_params(m: ModelSpec) -> dict[str, float]:
    """total: every stored parameter. active: parameters whose weights a token multiplies with
    (routed experts: top-k of them), i.e. non-embedding + lm_head; the input embedding table is a
    row lookup and is not counted (for tied models the shared matrix counts once, as lm_head)."""
    ops = model_ops(m, Workload("decode", 1, [(2, 1.0)]))
    total = sum(o.params for o in ops)
    active = sum(o.active_params for o in ops)
    embed = m.vocab_size * m.hidden_size
    return {"total": int(total), "active": int(active), "embedding": int(embed),
            "lm_head": int(embed), "active_non_embedding": int(active - embed),
            "active_with_embedding": int(active + (0 if m.tie_embeddings else embed))}
