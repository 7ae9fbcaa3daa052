"""A request as the scheduler sees it: tokens, progress, and its place in the KV cache."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from opdisagg_rt.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # Blocks allocated, KV being loaded from the external store in the background (vLLM v1's
    # name); not schedulable until the load finishes.
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    prompt: str | None = None
    # Tenant salt (vLLM's `cache_salt`): keys this request's prefix-cache blocks and store chunks,
    # so requests with different salts never share KV.
    cache_salt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit tokens at first admission (-1: not yet)
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    # metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
