"""Step metadata on the wire (raw tensors + a small JSON header, never pickle), the micro-batch
split, and the decode-first row order with its inverse permutation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from opdisagg_rt.disagg.transport import HEADER_JSON
from opdisagg_rt.step_batch import StepBatch

_TENSORS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
            "logits_indices")
_SCALARS = ("request_ids", "num_decodes", "query_lens_list", "seq_lens_list", "block_size")


@dataclass(slots=True)
class DisaggBatch:
    """What DisaggRunner.prepare hands to execute: one StepBatch per micro-batch, in row order."""
    parts: list[StepBatch]
    samples: list | None = None  # sampling on the stage: per part (header entry, tensors) for the lm_head stage

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)


def encode_batch(batch: StepBatch) -> tuple[dict, list[torch.Tensor]]:
    """Header scalars and tensors; a model with several KV cache groups (sliding-window and full
    layers) also sends every group's slot mapping and block tables."""
    header, tensors = {k: getattr(batch, k) for k in _SCALARS}, [getattr(batch, k) for k in _TENSORS]
    if batch.group_slot_mappings is not None:
        header["num_groups"] = len(batch.group_slot_mappings)
        tensors += [*batch.group_slot_mappings, *batch.group_block_tables]
    if batch.state_indices is not None:  # linear-attention layers: each request's state slot
        header["states"] = 1
        tensors.append(batch.state_indices)
    return header, tensors


def num_meta_tensors(header: dict) -> int:
    """How many of a step message's tensors are metadata (the rest: the sampling entry)."""
    return len(_TENSORS) + 2 * header.get("num_groups", 0) + header.get("states", 0)


def decode_batch(header: dict, tensors: Sequence[torch.Tensor]) -> StepBatch:
    """The tensors may be views of a transport buffer: the StepBatch uses them in place."""
    batch = StepBatch(**{k: header[k] for k in _SCALARS}, **dict(zip(_TENSORS, tensors)))
    g = header.get("num_groups", 0)
    if g:
        extra = tensors[len(_TENSORS):len(_TENSORS) + 2 * g]
        batch.group_slot_mappings, batch.group_block_tables = list(extra[:g]), list(extra[g:])
        batch.group_memos = [batch.memo] + [{} for _ in range(g - 1)]
    if header.get("states"):
        batch.state_indices = tensors[len(_TENSORS) + 2 * g]
    return batch


def metadata_bytes(header: dict, tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of one step message as encode_batch gives it: the JSON header and the tensors."""
    return len(HEADER_JSON.encode(header)) + sum(t.nbytes for t in tensors)


def split_micro_batches(scheduled: list, parts: int) -> list[list]:
    """Contiguous groups of requests (so concatenated logits keep the engine's order) with token
    counts as equal as the request boundaries allow. Each group stays decode-first."""
    parts = max(1, min(parts, len(scheduled)))
    if parts == 1:
        return [scheduled]
    sizes = [s.num_new_tokens for s in scheduled]
    total, groups, start = sum(sizes), [], 0
    acc = 0
    for k in range(1, parts):
        target = total * k / parts
        end = start + 1  # at least one request per group
        acc += sizes[start]
        while end < len(sizes) - (parts - k) and abs(acc + sizes[end] - target) < abs(acc - target):
            acc += sizes[end]
            end += 1
        groups.append(scheduled[start:end])
        start = end
    groups.append(scheduled[start:])
    return groups


def decode_first_order(query_lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Request permutation putting single-token queries (decodes) first, stable within each kind,
    the layout varlen/split decode-prefill attention kernels expect; and its inverse."""
    lens = torch.as_tensor(list(query_lens))
    perm = torch.cat([torch.nonzero(lens == 1).flatten(), torch.nonzero(lens != 1).flatten()])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return perm, inv


def row_permutation(query_lens: Sequence[int], req_perm: torch.Tensor) -> torch.Tensor:
    """Token-row permutation that moves whole requests as `req_perm` does."""
    lens = torch.as_tensor(list(query_lens))
    starts = torch.cumsum(lens, 0) - lens
    return torch.cat([torch.arange(int(starts[r]), int(starts[r] + lens[r])) for r in req_perm.tolist()]) \
        if len(lens) else torch.zeros(0, dtype=torch.long)
