"""Runs a list of operations over one step's batch: the one-stage case of disaggregation."""
from __future__ import annotations

import re
import time
from collections import defaultdict

from opdisagg_rt.layers.base import Op, Tensors
from opdisagg_rt.step_batch import StepBatch


def run_op(op: Op, t: Tensors, batch: StepBatch) -> None:
    """One operation; an attention layer of a model with several KV cache groups first points the
    batch at its group's slot mapping and block tables (a no-op for single-group models)."""
    g = getattr(op, "kv_group", None)
    if g is not None:
        batch.select_group(g)
    op.forward(t, batch)


def run_ops(ops: list[Op], batch: StepBatch, tensors: Tensors | None = None) -> Tensors:
    t: Tensors = {} if tensors is None else tensors
    for op in ops:
        run_op(op, t, batch)
    return t


def op_kind(name: str) -> str:
    """`layers.7.mlp` -> `layers.*.mlp`: the per-layer operations grouped across layers."""
    return re.sub(r"^layers\.\d+\.", "layers.*.", name)


def profile_ops(ops: list[Op], batch: StepBatch) -> dict[str, float]:
    """Run the ops once, returning seconds spent per operation kind (summed over layers)."""
    t: Tensors = {}
    spent: dict[str, float] = defaultdict(float)
    for op in ops:
        start = time.perf_counter()
        run_op(op, t, batch)
        spent[op_kind(op.name)] += time.perf_counter() - start
    return dict(spent)
