"""Turns a scheduler step into a StepBatch, runs the operations, returns the logits to sample.

It owns the model's operations and the paged KV caches (bound to each `layers.{i}.attn`).
"""
from __future__ import annotations

import torch

from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.layers.base import Op
from opdisagg_rt.models.executor import run_ops
from opdisagg_rt.step_batch import StepBatch

def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def kv_cache_budget(kv_cache_memory: float | int) -> int:
    """`kv_cache_memory`: bytes (an int above 1) or a fraction of the free RAM (0 < x <= 1)."""
    if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, (int, float)) or kv_cache_memory <= 0:
        raise ValueError(f"kv_cache_memory must be bytes (> 1) or a fraction in (0, 1], got {kv_cache_memory!r}")
    if kv_cache_memory <= 1:
        return int(available_memory_bytes() * kv_cache_memory)
    return int(kv_cache_memory)


class ModelRunner:
    def __init__(self, ops: list[Op], block_size: int, dtype: torch.dtype):
        self.ops = ops
        self.block_size = block_size
        self.dtype = dtype
        self.attn_ops = [op for op in ops if isinstance(op, AttentionOp)]
        self.num_blocks = 0

    def block_bytes(self) -> int:
        """Bytes of one KV block across every attention layer (K and V)."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return sum(2 * self.block_size * op.num_kv_heads * op.head_dim * elem for op in self.attn_ops)

    def allocate_kv_cache(self, budget_bytes: int) -> int:
        num_blocks = budget_bytes // self.block_bytes()
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory of {budget_bytes} bytes holds {num_blocks} KV blocks "
                             f"of {self.block_bytes()} bytes; need at least 2")
        for op in self.attn_ops:
            shape = (num_blocks, self.block_size, op.num_kv_heads, op.head_dim)
            # zeros (lazily mapped by the OS) keep never-written slots finite for masked reads.
            op.bind_cache(torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
        self.num_blocks = num_blocks
        return num_blocks

    def prepare(self, scheduled) -> StepBatch:
        """scheduled: ScheduledRequest list with single-token queries first."""
        bs = self.block_size
        starts, query_lens, seq_lens, tokens, tables, logits_rows = [], [], [], [], [], []
        row = 0
        for s in scheduled:
            r, n = s.request, s.num_new_tokens
            start = r.num_computed_tokens
            num_prompt = r.num_prompt_tokens
            if start + n <= num_prompt:
                tokens.extend(r.prompt_token_ids[start:start + n])
            else:
                tokens.extend(r.all_token_ids[start:start + n])
            starts.append(start)
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(s.block_table)
            row += n
            if s.samples:
                logits_rows.append(row - 1)
        num_decodes = sum(1 for n in query_lens if n == 1)
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
        qlens = torch.tensor(query_lens)
        req_of_row = torch.repeat_interleave(torch.arange(len(scheduled)), qlens)
        cu = torch.zeros(len(scheduled) + 1, dtype=torch.long)
        torch.cumsum(qlens, 0, out=cu[1:])
        positions = torch.arange(row) - cu[:-1][req_of_row] + torch.tensor(starts)[req_of_row]
        slot_mapping = block_tables[req_of_row, positions // bs] * bs + positions % bs
        return StepBatch(
            request_ids=[s.request.request_id for s in scheduled],
            input_ids=torch.tensor(tokens, dtype=torch.long), positions=positions,
            slot_mapping=slot_mapping, query_start_loc=cu, seq_lens=torch.tensor(seq_lens),
            block_tables=block_tables, logits_indices=torch.tensor(logits_rows, dtype=torch.long),
            num_decodes=num_decodes, query_lens_list=query_lens, seq_lens_list=seq_lens, block_size=bs)

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] (float32)."""
        return run_ops(self.ops, batch)["logits"]
