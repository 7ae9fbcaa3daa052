"""RMSNorm as an operation over the residual stream."""
from __future__ import annotations

import torch

from opdisagg_rt import ops
from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.step_batch import StepBatch


class RMSNormOp(Op):
    """reads `residual`, writes `hidden`; `rows` = "logits" normalizes only the rows whose
    logits are needed (the final norm), so the LM head never sees prefill rows it would discard."""

    def __init__(self, name: str, weight: torch.Tensor, eps: float, rows: str = "all"):
        self.name, self.weight, self.eps, self.rows = name, weight, eps, rows
        self.reads, self.writes = ("residual",), ("hidden",)

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        x = t["residual"]
        if self.rows == "logits":
            x = x.index_select(0, batch.logits_indices)
        t["hidden"] = ops.rms_norm(x, self.weight, self.eps)
