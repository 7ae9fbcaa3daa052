"""`layers.{i}.moe`: a Mixture-of-Experts feed-forward block as one placeable operation.

It reads `hidden` (the normalized rows) and `residual`, and adds its output into `residual`,
like `layers.{i}.mlp`. Inside, two named parts (`layers.{i}.moe.router`, `layers.{i}.moe.experts`,
the finer names of DESIGN.md; their weights are reported under those prefixes by `parameters()`)
and an optional shared expert:

- router: logits = x @ W_r^T (+ bias, gpt-oss); either softmax over all experts then top-k
  (Mixtral, Qwen-MoE), optionally renormalised over the k, or top-k of the logits then a softmax
  over those k (gpt-oss; the same weights as softmax + renormalise, in gpt-oss's order of ops).
- experts: the (token, slot) pairs are sorted by expert id, so each active expert runs one
  gate/up GEMM and one down GEMM per step over its rows (the Linear class: prepacked bf16
  kernels), then the rows are scaled by their routing weight and summed back per token.
  Activations: SwiGLU (`silu`), or gpt-oss's clamped SwiGLU (`swiglu_oai`: gate clamped above at
  `limit`, up clamped to [-limit, limit], gate * sigmoid(alpha * gate) * (up + 1)); optional
  expert biases. Expert weights are held in nn.Linear layout, gate rows then up rows
  ([2I, H]) — loaders de-interleave gpt-oss's fused [H, 2I] tensor.
- shared expert (Qwen2-MoE / Qwen3-Next style): a SwiGLU MLP on every token, scaled by
  sigmoid(x @ w_gate^T) when a gate is given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opdisagg_rt import ops
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.step_batch import StepBatch

ACTIVATIONS = ("silu", "swiglu_oai")


@dataclass(frozen=True)
class RouterConfig:
    top_k: int
    renormalize: bool = True  # softmax over all experts, top-k, divide by the k weights' sum
    softmax_after_topk: bool = False  # gpt-oss: top-k of the logits, softmax over those k


def route(logits: torch.Tensor, cfg: RouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids int64 [T, k], float32 weights [T, k])."""
    if cfg.softmax_after_topk:
        top_v, top_i = torch.topk(logits, cfg.top_k, dim=-1)
        return top_i, torch.softmax(top_v.float(), dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    top_v, top_i = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.renormalize:
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
    return top_i, top_v


def swiglu_oai(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation on [.., gate | up] halves."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class Router:
    """`layers.{i}.moe.router`: logits, top-k ids and weights."""

    def __init__(self, name: str, weight: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None):
        self.name, self.cfg = name, cfg
        self.num_experts = weight.shape[0]
        if not 0 < cfg.top_k <= self.num_experts:
            raise ValueError(f"{name}: top_k={cfg.top_k} must be in [1, {self.num_experts}]")
        self.proj = Linear(weight, bias)

    def parameters(self) -> dict[str, torch.Tensor]:
        p = {"weight": self.proj.weight}
        return p | ({"bias": self.proj.bias} if self.proj.bias is not None else {})

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(self.proj(x), self.cfg)


class Experts:
    """`layers.{i}.moe.experts`: E gated MLPs; rows grouped by expert, one GEMM pair per
    active expert."""

    def __init__(self, name: str, gate_up: torch.Tensor, down: torch.Tensor,
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                 activation: str = "silu", alpha: float = 1.702, limit: float = 7.0):
        """gate_up: [E, 2I, H] (gate rows then up rows); down: [E, H, I]; biases [E, 2I], [E, H]."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.name, self.activation, self.alpha, self.limit = name, activation, alpha, limit
        self.num_experts = gate_up.shape[0]
        self.gate_up = [Linear(gate_up[e], None if gate_up_bias is None else gate_up_bias[e].contiguous())
                        for e in range(self.num_experts)]
        self.down = [Linear(down[e], None if down_bias is None else down_bias[e].contiguous())
                     for e in range(self.num_experts)]

    def parameters(self) -> dict[str, torch.Tensor]:
        p: dict[str, torch.Tensor] = {}
        for e in range(self.num_experts):
            for part, lin in (("gate_up", self.gate_up[e]), ("down", self.down[e])):
                p[f"{e}.{part}"] = lin.weight
                if lin.bias is not None:
                    p[f"{e}.{part}_bias"] = lin.bias
        return p

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return ops.silu_and_mul(h)
        return swiglu_oai(h, self.alpha, self.limit)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; ids, weights [T, k] -> sum_j weights[t, j] * expert_{ids[t, j]}(x[t])."""
        t, k = ids.shape
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // k
        xs = x.index_select(0, token)
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = xs[start:start + n]
                ys[start:start + n] = self.down[e](self._act(self.gate_up[e](rows)))
                start += n
        scaled = (ys.float() * weights.flatten().index_select(0, order)[:, None]).to(x.dtype)
        out = torch.zeros_like(x)
        out.index_add_(0, token, scaled)
        return out


class SharedExpert:
    """A SwiGLU MLP run on every token, optionally scaled by sigmoid(x @ gate^T)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gate_proj: torch.Tensor | None = None):
        self.gate_up = Linear(torch.cat([gate, up], 0))
        self.down = Linear(down)
        self.gate = None if gate_proj is None else Linear(gate_proj.reshape(1, -1))

    def parameters(self) -> dict[str, torch.Tensor]:
        p = {"gate_up": self.gate_up.weight, "down": self.down.weight}
        return p | ({"gate": self.gate.weight} if self.gate is not None else {})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(ops.silu_and_mul(self.gate_up(x)))
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y


class MoEOp(Op):
    """`layers.{i}.moe`: reads `hidden`, `residual`; writes `residual`."""

    def __init__(self, name: str, router: Router, experts: Experts, shared: SharedExpert | None = None):
        if router.num_experts != experts.num_experts:
            raise ValueError(f"{name}: router has {router.num_experts} experts, weights hold {experts.num_experts}")
        self.name, self.router, self.experts, self.shared = name, router, experts, shared
        self.reads, self.writes = ("hidden", "residual"), ("residual",)

    @property
    def top_k(self) -> int:
        return self.router.cfg.top_k

    def parameters(self) -> dict[str, torch.Tensor]:
        p = {f"router.{k}": v for k, v in self.router.parameters().items()}
        p |= {f"experts.{k}": v for k, v in self.experts.parameters().items()}
        if self.shared is not None:
            p |= {f"shared_expert.{k}": v for k, v in self.shared.parameters().items()}
        return p

    def moe(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        ids, weights = self.router(x)
        out = self.experts(x, ids, weights)
        if self.shared is not None:
            out = out + self.shared(x)
        return out

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["residual"] = t["residual"] + self.moe(t["hidden"])


def moe_reference(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None, cfg: RouterConfig,
                  gate_up: torch.Tensor, down: torch.Tensor, gate_up_b: torch.Tensor | None,
                  down_b: torch.Tensor | None, activation: str = "silu", alpha: float = 1.702,
                  limit: float = 7.0) -> torch.Tensor:
    """Naive per-token loop in float64 (tests): no grouping, no fused kernels."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = F.linear(x[t], router_w.double(), None if router_b is None else router_b.double())
        if cfg.softmax_after_topk:
            v, i = logits.topk(cfg.top_k)
            w = v.softmax(-1)
        else:
            p = logits.softmax(-1)
            w, i = p.topk(cfg.top_k)
            if cfg.renormalize:
                w = w / w.sum()
        for wj, e in zip(w.tolist(), i.tolist()):
            h = F.linear(x[t], gate_up[e].double(), None if gate_up_b is None else gate_up_b[e].double())
            g, u = h.chunk(2)
            if activation == "silu":
                a = F.silu(g) * u
            else:
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
                a = g * torch.sigmoid(alpha * g) * (u + 1)
            out[t] += wj * F.linear(a, down[e].double(), None if down_b is None else down_b[e].double())
    return out
