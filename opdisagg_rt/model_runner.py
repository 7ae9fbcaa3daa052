"""Turns a scheduler step into a StepBatch, runs the operations, returns the logits to sample.

It owns the model's operations and the paged KV caches (bound to each `layers.{i}.attn`).

KV cache groups (hybrid models, vLLM v1's hybrid layout): the attention layers are grouped by
window (full attention is window None). When every layer's block has the same shape, each window
type is cut into groups of K layers, K = gcd of the per-type layer counts, and the j-th layer of
every group shares the j-th of K cache tensor pairs: one pool of block ids serves all groups, a
block id belongs to one group at a time, so blocks a sliding-window group frees hold the next
full-attention block. One block's bytes = K layers' K and V. (Different per-layer shapes fall back
to a tensor pair per layer and no sharing.) Each group has its own block tables and slot mapping
in the StepBatch; `execute` selects a layer's group before running it, so the attention op's
forward reads `batch.slot_mapping` / `batch.block_tables` as before.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

from opdisagg_rt.cache.kv_cache_manager import KVCacheSpec, KVGroupSpec
from opdisagg_rt.cache.state_pool import StatePool, StateSpec, state_specs
from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.layers.base import Op
from opdisagg_rt.models.executor import run_ops
from opdisagg_rt.step_batch import StepBatch

logger = logging.getLogger(__name__)

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
    def __init__(self, ops: list[Op], block_size: int, dtype: torch.dtype, max_num_seqs: int = 64):
        self.ops = ops
        self.block_size = block_size
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs  # state-pool slots (linear-attention models)
        self.attn_ops = [op for op in ops if isinstance(op, AttentionOp)]
        self.num_blocks = 0
        self.kv_spec: KVCacheSpec | None = None  # set by allocate_kv_cache, read by the engine
        self.state_pool: StatePool | None = None

    # -- KV cache layout --------------------------------------------------------------------------

    def kv_layout(self) -> tuple[list[KVGroupSpec], dict[str, tuple[int, int]], int]:
        """(groups, {layer name: (group, tensor pair)}, number of tensor pairs)."""
        by_window: dict[int | None, list] = {}
        for op in self.attn_ops:
            by_window.setdefault(op.window or None, []).append(op)
        if not by_window:
            return [KVGroupSpec()], {}, 0
        kinds = sorted(by_window, key=lambda w: (w is not None, w or 0))  # full attention first
        shared = len({(op.num_kv_heads, op.head_dim) for op in self.attn_ops}) == 1
        size = math.gcd(*(len(v) for v in by_window.values())) if shared else None
        groups, where, pair = [], {}, 0
        for w in kinds:
            members = by_window[w]
            step = size or len(members)
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                for j, op in enumerate(chunk):
                    where[op.name] = (len(groups), j if shared else pair + j)
                if not shared:
                    pair += len(chunk)
                groups.append(KVGroupSpec(tuple(op.name for op in chunk), w))
        return groups, where, (size if shared else pair)

    @functools.cached_property
    def num_groups(self) -> int:  # the ops, hence the layout, are fixed once built
        return len(self.kv_layout()[0])

    def block_bytes(self) -> int:
        """Bytes of one KV block id (K and V of every attention layer that can use it)."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        _, where, _ = self.kv_layout()
        per_pair = {}
        for op in self.attn_ops:
            per_pair[where[op.name][1]] = 2 * self.block_size * op.num_kv_heads * op.head_dim * elem
        return sum(per_pair.values())

    def num_kv_blocks(self, budget_bytes: int, states: dict[str, StateSpec]) -> int:
        """KV blocks the budget holds once the linear-attention `states` of max_num_seqs sequences
        are set aside (the disaggregated runner counts the same blocks for its stages)."""
        state_bytes = StatePool.slot_bytes(states) * self.max_num_seqs if states else 0
        if state_bytes:
            if state_bytes >= budget_bytes:
                raise ValueError(f"kv_cache_memory of {budget_bytes} bytes cannot hold the linear-attention "
                                 f"states of {self.max_num_seqs} sequences ({state_bytes} bytes)")
            budget_bytes -= state_bytes
        block_bytes = self.block_bytes() if self.attn_ops else 0
        num_blocks = budget_bytes // block_bytes if block_bytes else 2
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory of {budget_bytes} bytes holds {num_blocks} KV blocks "
                             f"of {block_bytes} bytes; need at least 2")
        return num_blocks

    def allocate_kv_cache(self, budget_bytes: int) -> int:
        states = state_specs(self.ops)
        num_blocks = self.num_kv_blocks(budget_bytes, states)
        groups, where, pairs = self.kv_layout()
        caches = {}
        for op in self.attn_ops:
            g, j = where[op.name]
            if j not in caches:
                shape = (num_blocks, self.block_size, op.num_kv_heads, op.head_dim)
                # zeros (lazily mapped by the OS) keep never-written slots finite for masked reads.
                caches[j] = (torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
            op.bind_cache(*caches[j])
            op.kv_group = g  # which group's slot mapping / block tables this layer reads
        if states:
            self.state_pool = StatePool(states, self.max_num_seqs)
            self.state_pool.bind(self.ops)
        self.kv_spec = KVCacheSpec(groups, self.state_pool)
        self.num_blocks = num_blocks
        if len(groups) > 1 or groups[0].window is not None:
            bs = self.block_size
            per_seq = [f"window {g.window}: <= {-(-g.window // bs) + 1} blocks/seq" if g.window is not None
                       else "full: all blocks" for g in groups]
            logger.info("KV cache: %d blocks of %d bytes (%d layers each) shared by %d groups (%s)",
                        num_blocks, self.block_bytes(), pairs, len(groups), "; ".join(per_seq))
        return num_blocks

    # -- steps ------------------------------------------------------------------------------------

    def prepare(self, scheduled) -> StepBatch:
        """scheduled: ScheduledRequest list with single-token queries first.

        Positions and slot mappings are built as Python lists and each tensor is made once: a
        decode step is a few dozen list entries, for which the torch calls of a vectorised build
        (arange, repeat_interleave, gathers) cost more (16 decode rows: 0.158 -> 0.099 ms,
        interleaved in one process; a 512-token prefill chunk: 0.21 -> 0.25 ms)."""
        bs = self.block_size
        num_groups = self.num_groups
        tokens, positions, query_lens, seq_lens, logits_rows, cu = [], [], [], [], [], [0]
        tables: list[list[list[int]]] = [[] for _ in range(num_groups)]
        slots: list[list[int]] = [[] for _ in range(num_groups)]
        for s in scheduled:
            r, n = s.request, s.num_new_tokens
            start = r.num_computed_tokens
            end = start + n
            num_prompt = r.num_prompt_tokens
            if end <= num_prompt:
                tokens.extend(r.prompt_token_ids[start:end])
            elif start >= num_prompt:  # a decode: no copy of the whole history
                tokens.extend(r.output_token_ids[start - num_prompt:end - num_prompt])
            else:
                tokens.extend(r.all_token_ids[start:end])
            group_tables = getattr(s, "group_block_tables", None) or [s.block_table]
            if len(group_tables) != num_groups:
                raise ValueError(f"request {r.request_id}: {len(group_tables)} block tables for "
                                 f"{num_groups} KV cache groups")
            if n == 1:  # a decode row without a comprehension per row: 13% of a 16-row prepare
                positions.append(start)
                for g, t in enumerate(group_tables):
                    tables[g].append(t)
                    slots[g].append(t[start // bs] * bs + start % bs)
            else:
                positions.extend(range(start, end))
                for g, t in enumerate(group_tables):
                    tables[g].append(t)
                    slots[g].extend([t[p // bs] * bs + p % bs for p in range(start, end)])
            query_lens.append(n)
            seq_lens.append(end)
            cu.append(cu[-1] + n)
            if s.samples:
                logits_rows.append(cu[-1] - 1)
        num_decodes = sum(1 for n in query_lens if n == 1)
        block_tables = []
        for g in range(num_groups):
            width = max(len(t) for t in tables[g])
            block_tables.append(torch.tensor([t + [0] * (width - len(t)) for t in tables[g]], dtype=torch.long))
        slot_mappings = [torch.tensor(x, dtype=torch.long) for x in slots]
        state_indices = None
        if self.state_pool is not None:
            state_indices = torch.tensor([getattr(s, "state_index", -1) for s in scheduled], dtype=torch.long)
        multi = num_groups > 1
        batch = StepBatch(
            request_ids=[s.request.request_id for s in scheduled],
            input_ids=torch.tensor(tokens, dtype=torch.long), positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=slot_mappings[0], query_start_loc=torch.tensor(cu, dtype=torch.long),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long), block_tables=block_tables[0],
            logits_indices=torch.tensor(logits_rows, dtype=torch.long),
            num_decodes=num_decodes, query_lens_list=query_lens, seq_lens_list=seq_lens, block_size=bs,
            group_slot_mappings=slot_mappings if multi else None,
            group_block_tables=block_tables if multi else None,
            group_memos=[{} for _ in range(num_groups)] if multi else None,
            state_indices=state_indices)
        if multi:
            batch.group_memos[0] = batch.memo
        return batch

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] (float32)."""
        logits = run_ops(self.ops, batch)["logits"]
        batch.select_group(0)
        return logits
