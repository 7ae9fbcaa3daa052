"""Token embedding and LM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.layers.linear import Linear
from opdisagg_rt.step_batch import StepBatch


class EmbedOp(Op):
    def __init__(self, name: str, weight: torch.Tensor):
        self.name, self.weight = name, weight
        self.reads, self.writes = (), ("residual",)

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["residual"] = F.embedding(batch.input_ids, self.weight)


class LMHeadOp(Op):
    """reads the normalized hidden rows of sampled positions, writes float32 `logits`."""

    def __init__(self, name: str, weight: torch.Tensor):
        self.name, self.weight = name, weight
        self.proj = Linear(weight)
        self.reads, self.writes = ("hidden",), ("logits",)

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        t["logits"] = self.proj(t["hidden"]).float()
