"""Fixed-size per-sequence states of linear-attention layers (MiniMax lightning attention,
Qwen3-Next Gated DeltaNet): one convolution state and one float32 recurrent state per layer.

A linear-attention layer keeps no per-token KV: its whole context is folded into these states,
so a request holds one *slot* of the pool (the same index in every layer's tensors) from its
first scheduling until it finishes, is aborted or is preempted. A slot is zeroed whenever it is
handed out, so a preempted request (whose prompt is recomputed from token 0, like its KV) starts
again from the empty state: correct by construction, nothing to snapshot.

Layer protocol (for the linear-attention ops): an op exposes `state_spec() -> StateSpec` and
`bind_state(conv, recurrent)`; the runner binds the pool's `[num_slots, ...]` tensors, and the op
reads its rows' slots from `StepBatch.state_indices` (one int64 per request, -1 = none).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class StateSpec:
    """Per-sequence state shapes of one linear-attention layer (as the layer gives them)."""
    conv_shape: tuple[int, ...]
    recurrent_shape: tuple[int, ...]
    conv_dtype: torch.dtype = torch.float32

    def nbytes(self) -> int:
        conv = torch.tensor([], dtype=self.conv_dtype).element_size()
        n = 1
        for d in self.conv_shape:
            n *= d
        m = 1
        for d in self.recurrent_shape:
            m *= d
        return n * conv + m * 4  # the recurrent state is always float32


def state_specs(ops) -> dict[str, StateSpec]:
    """The per-sequence state of every linear-attention op among `ops` (those with state_spec())."""
    return {op.name: op.state_spec() for op in ops if callable(getattr(op, "state_spec", None))}


class StatePool:
    def __init__(self, specs: dict[str, StateSpec], num_slots: int):
        if num_slots < 1:
            raise ValueError(f"a state pool needs at least one slot, got {num_slots}")
        self.specs = dict(specs)
        self.num_slots = num_slots
        self.conv = {n: torch.zeros(num_slots, *s.conv_shape, dtype=s.conv_dtype) for n, s in self.specs.items()}
        self.recurrent = {n: torch.zeros(num_slots, *s.recurrent_shape, dtype=torch.float32)
                          for n, s in self.specs.items()}
        self._free: deque[int] = deque(range(num_slots))
        self._owner: dict[str, int] = {}
        self.num_allocations = 0
        self.num_resets = 0

    @staticmethod
    def slot_bytes(specs: dict[str, StateSpec]) -> int:
        return sum(s.nbytes() for s in specs.values())

    def bind(self, ops) -> None:
        """Give every op this pool holds states for its [num_slots, ...] tensors."""
        for op in ops:
            if op.name in self.specs:
                op.bind_state(self.conv[op.name], self.recurrent[op.name])

    @property
    def num_free(self) -> int:
        return len(self._free)

    def index(self, request_id: str) -> int:
        """The request's slot, or -1 if it holds none."""
        return self._owner.get(request_id, -1)

    def allocate(self, request_id: str) -> int:
        """The request's slot (a new, zeroed one if it holds none). Raises if the pool is full."""
        idx = self._owner.get(request_id)
        if idx is not None:
            return idx
        if not self._free:
            raise RuntimeError(f"state pool full ({self.num_slots} slots)")
        idx = self._free.popleft()
        self.reset(idx)
        self._owner[request_id] = idx
        self.num_allocations += 1
        return idx

    def reset(self, idx: int) -> None:
        for t in self.conv.values():
            t[idx].zero_()
        for t in self.recurrent.values():
            t[idx].zero_()
        self.num_resets += 1

    def free(self, request_id: str) -> None:
        idx = self._owner.pop(request_id, None)
        if idx is not None:
            self._free.append(idx)
