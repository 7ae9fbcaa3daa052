"""Per-step metadata: built once per step by the model runner, read by every operation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(slots=True)
class StepBatch:
    """One step's rows. Rows of request r are `query_start_loc[r]:query_start_loc[r+1]`.
    Requests with a single query token (decodes) come first: `num_decodes` of them."""

    request_ids: list[str]
    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64
    slot_mapping: torch.Tensor       # [T] int64, -1 = do not cache
    query_start_loc: torch.Tensor    # [R+1] int64 (cu_seqlens_q)
    seq_lens: torch.Tensor           # [R] int64: context length after this step
    block_tables: torch.Tensor       # [R, max_blocks] int64, padded with 0
    logits_indices: torch.Tensor     # [S] rows whose next-token logits are needed
    num_decodes: int
    query_lens_list: list[int]
    seq_lens_list: list[int]
    block_size: int
    memo: dict[str, Any] = field(default_factory=dict)  # derived tensors shared by layers
    # Hybrid KV cache (several KV cache groups): each group's slot_mapping [T] and block tables
    # [R, max_blocks_g]; `slot_mapping`/`block_tables` above are the selected group's (group 0's
    # unless `select_group` switched them). None when the model has a single group.
    group_slot_mappings: list[torch.Tensor] | None = None
    group_block_tables: list[torch.Tensor] | None = None
    group_memos: list[dict[str, Any]] | None = None  # memo per group (derived from its tables)
    group: int = 0
    # Linear-attention state slot of each request ([R] int64, -1 = none), or None.
    state_indices: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_reqs(self) -> int:
        return len(self.request_ids)

    def select_group(self, g: int) -> None:
        """Point `slot_mapping`, `block_tables` and `memo` at KV cache group g's (the runner
        calls this before each attention layer of a multi-group model)."""
        if self.group_slot_mappings is None or g == self.group:
            return
        self.slot_mapping = self.group_slot_mappings[g]
        self.block_tables = self.group_block_tables[g]
        self.memo = self.group_memos[g]
        self.group = g

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """Compute a derived value (a mask, gathered indices) once per step for all layers."""
        value = self.memo.get(key)
        if value is None:
            value = self.memo[key] = build()
        return value
