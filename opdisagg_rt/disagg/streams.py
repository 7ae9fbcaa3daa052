"""Micro-batches as independent request streams: continuous ping-pong across steps.

Each stream has its own scheduler (over the one shared KV cache) and its own channels to the
stage workers. Every engine step starts a step for each idle stream, then completes the oldest
in-flight one: while the engine samples stream A's tokens and schedules A's next step, stream B
is on the stages, so the pipeline does not fill and drain every step.

StreamScheduler looks like one Scheduler to the engine, so the engine's step loop is unchanged:
its schedule() returns the completed stream's output, and the runner's prepare/execute then
hand back that stream's logits.
"""
from __future__ import annotations

from collections import ChainMap, deque

from opdisagg_rt.scheduler.scheduler import Scheduler, SchedulerOutput


class StreamScheduler:
    def __init__(self, base: Scheduler, runner):
        n = runner.num_streams
        self.runner = runner
        self.scheds = [base] + [Scheduler(base.kv, base.max_num_seqs, base.max_num_batched_tokens,
                                          base.max_model_len, connector=getattr(base, "connector", None))
                                for _ in range(n - 1)]
        # the same number of sequences (and tokens) per round as one scheduler's step; a long prefill
        # is chunked per stream, so the streams' prefill chunks pipeline through the stages instead
        # of one stream's whole prefill holding the first stage while the last idles
        seqs, tokens = max(1, base.max_num_seqs // n), max(1, base.max_num_batched_tokens // n)
        for s in self.scheds:  # (read from base once: base is one of them)
            s.max_num_seqs, s.max_num_batched_tokens = seqs, tokens
        self.kv, self.connector = base.kv, getattr(base, "connector", None)
        self.inflight: list[SchedulerOutput | None] = [None] * n
        self.order: deque[int] = deque()  # streams in flight, oldest first
        self.current = 0
        self.deferred: list = []  # (request, status) finishes waiting for their step to complete

    @property
    def requests(self):
        return ChainMap(*[s.requests for s in self.scheds])

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.scheds)

    def add_request(self, req) -> None:
        min(self.scheds, key=lambda s: len(s.requests)).add_request(req)  # balance the streams

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.scheds) or bool(self.order)

    def _owner(self, req) -> Scheduler:
        return next((s for s in self.scheds if req.request_id in s.requests), self.scheds[self.current])

    def finish(self, req, status) -> None:
        # An abort of a request whose step is still on the stages: freeing its KV blocks now would
        # let another stream's step reuse them while the stages still write them. Defer.
        if any(out is not None and any(s.request is req for s in out.scheduled) for out in self.inflight):
            self.deferred.append((req, status))
            return
        self._owner(req).finish(req, status)
        if not self.has_unfinished():  # the engine goes idle: its next steps are no turnarounds
            self.runner.collected_at.clear()

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]):
        return self.scheds[self.current].update_from_output(out, sampled)

    def schedule(self) -> SchedulerOutput:
        pending, self.deferred = self.deferred, []
        for req, status in pending:
            if not req.is_finished:
                self.finish(req, status)
        for k, sched in enumerate(self.scheds):
            if self.inflight[k] is None:
                out = sched.schedule()
                if out.scheduled:
                    try:
                        self.runner.submit(k, self.runner.prepare(out.scheduled))
                    except Exception:  # noqa: BLE001 - the runner is down: execute() fails this step
                        pass
                    self.inflight[k] = out
                    self.order.append(k)
                else:  # an idle stream: its next step (if any) is no turnaround of the last one
                    self.runner.collected_at.pop(k, None)
        if not self.order:
            return SchedulerOutput([])
        k = self.current = self.order.popleft()
        out, self.inflight[k] = self.inflight[k], None
        self.runner.collect_next = k
        return out
