"""An operation: a named, placeable step of the forward pass that declares its tensors.

The executor walks a list of operations over a dict of named activations; the stage graph
derives which tensors cross a stage boundary from `reads`/`writes`.
"""
from __future__ import annotations

import torch

from opdisagg_rt.step_batch import StepBatch

Tensors = dict[str, torch.Tensor]


class Op:
    name: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def forward(self, t: Tensors, batch: StepBatch) -> None:
        raise NotImplementedError

    def parameters(self) -> dict[str, torch.Tensor]:
        """Tensors this op holds (weights), by name, for memory reports and placement."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters().values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}: {','.join(self.reads)} -> {','.join(self.writes)})"
