"""What the engine hands back per request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the in-engine prefix cache
    num_preemptions: int = 0
    num_store_tokens: int = 0  # prompt tokens loaded from the external KV store (kvstore)

    @property
    def num_computed_prompt_tokens(self) -> int:
        """Prompt tokens prefilled here: neither from the prefix cache nor from the store."""
        return self.num_prompt_tokens - self.num_cached_tokens - self.num_store_tokens

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.finished_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token: {token_id: logprob} with the sampled token and the top-n (raw model logprobs).
    logprobs: list[dict[int, float]] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    # The part new since the previous output of this request (streaming).
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
