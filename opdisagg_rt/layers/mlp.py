"""SwiGLU MLP with fused gate/up projection; adds its output into the residual stream."""
from __future__ import annotations

import torch

from opdisagg_rt import ops
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.step_batch import StepBatch


class SwiGLUMLPOp(Op):
    def __init__(self, name: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        self.name = name
        self.intermediate = gate.shape[0]
        self.gate_up = Linear(torch.cat([gate, up], 0))  # one GEMM instead of two
        self.down = Linear(down)
        self.reads, self.writes = ("hidden", "residual"), ("residual",)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"gate_up": self.gate_up.weight, "down": self.down.weight}

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["residual"] = self.down(ops.silu_and_mul(self.gate_up(t["hidden"])), residual=t["residual"])
