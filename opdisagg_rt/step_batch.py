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

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_reqs(self) -> int:
        return len(self.request_ids)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """Compute a derived value (a mask, gathered indices) once per step for all layers."""
        value = self.memo.get(key)
        if value is None:
            value = self.memo[key] = build()
        return value
