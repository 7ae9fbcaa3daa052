"""The stage graph: visits (maximal runs of consecutive operations on one stage) and the tensors
that cross between them, derived only from each operation's `reads`/`writes`.

A tensor crosses to stage S only if an operation on S reads it while S does not hold its current
version (the last write happened elsewhere); so the residual stream never travels to a stage that
does not read it. A message is one producer visit's tensors for one destination stage; the
destination receives it at its first visit after the producer (so every channel stays FIFO) and
keeps (copies) a tensor only when a later visit of its own still needs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

DRIVER = "driver"  # the engine process: sends step metadata, receives the logits


@dataclass(slots=True)
class OpSig:
    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]


@dataclass(slots=True)
class Message:
    src: str                      # producing stage
    dst: str                      # consuming stage (or DRIVER)
    producer: int                 # visit index that sends it (at its end)
    receiver: int                 # visit index of dst that receives it (at its start); -1 = driver
    names: tuple[str, ...]        # tensors, in message order


@dataclass(slots=True)
class Visit:
    index: int
    stage: str
    ops: list[str]
    recv: list[Message] = field(default_factory=list)   # in producer order
    send: list[Message] = field(default_factory=list)
    keep: set[str] = field(default_factory=set)          # received here, read by a later visit of this stage


@dataclass(slots=True)
class StageGraph:
    visits: list[Visit]
    stages: list[str]
    outputs: tuple[str, ...]

    def visits_of(self, stage: str) -> list[Visit]:
        return [v for v in self.visits if v.stage == stage]

    def messages(self) -> list[Message]:
        return [m for v in self.visits for m in v.send]

    def channels(self) -> list[tuple[str, str]]:
        return sorted({(m.src, m.dst) for m in self.messages()})

    def crossing(self) -> dict[tuple[str, str], set[str]]:
        """(src, dst) -> every tensor name that ever travels on that channel."""
        out: dict[tuple[str, str], set[str]] = {}
        for m in self.messages():
            out.setdefault((m.src, m.dst), set()).update(m.names)
        return out

    def slots_needed(self, micro_batches: int) -> dict[tuple[str, str], int]:
        """Ring slots per channel so that a sender never waits on a full ring forever.

        Units run in visit-major order (visit 0 of every micro-batch, then visit 1, ...). A message
        is held from its send until the end of its receiving unit; if the earliest unfinished unit
        can always place its message, the pipeline cannot deadlock, so each channel needs the
        maximum number of messages alive at any point of that order."""
        m_ = micro_batches
        end = len(self.visits) * m_ + m_  # the driver reads after the last visit
        alive: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for msg in self.messages():
            for mb in range(m_):
                sent = msg.producer * m_ + mb
                freed = end if msg.receiver < 0 else msg.receiver * m_ + mb
                alive.setdefault((msg.src, msg.dst), []).append((sent, freed))
        return {ch: max(sum(1 for s, f in spans if s <= c <= f) for c in range(end + 1))
                for ch, spans in alive.items()}

    def describe(self) -> str:
        lines = []
        for v in self.visits:
            got = "; ".join(f"{','.join(m.names)} from {m.src}" for m in v.recv)
            sent = "; ".join(f"{','.join(m.names)} to {m.dst}" for m in v.send)
            first, last = v.ops[0], v.ops[-1]
            span = first if first == last else f"{first} .. {last} ({len(v.ops)} ops)"
            lines.append(f"visit {v.index:3d} [{v.stage}] {span}" + (f"  <- {got}" if got else "")
                         + (f"  -> {sent}" if sent else ""))
        return "\n".join(lines)


def build_visits(ops: Iterable[OpSig], owner: dict[str, str]) -> list[Visit]:
    visits: list[Visit] = []
    for op in ops:
        st = owner[op.name]
        if not visits or visits[-1].stage != st:
            visits.append(Visit(len(visits), st, []))
        visits[-1].ops.append(op.name)
    return visits


def build_graph(ops: list[OpSig], owner: dict[str, str], outputs: tuple[str, ...] = ("logits",)) -> StageGraph:
    sig = {op.name: op for op in ops}
    visits = build_visits(ops, owner)
    stages = list(dict.fromkeys(owner[op.name] for op in ops))
    holders: dict[str, set[str]] = {}      # tensor -> stages holding its current version
    writer: dict[str, int] = {}            # tensor -> visit that wrote its current version
    pending: dict[tuple[int, str], Message] = {}  # (producer visit, dst) -> message being built

    def need(name: str, stage: str, at: int) -> None:
        if stage in holders.get(name, ()):
            return
        if name not in writer:
            raise ValueError(f"tensor {name!r} is read before any operation writes it")
        p = writer[name]
        key = (p, stage)
        if key not in pending:
            recv_at = at if stage == DRIVER else next(v.index for v in visits[p + 1:] if v.stage == stage)
            pending[key] = Message(visits[p].stage, stage, p, -1 if stage == DRIVER else recv_at, ())
            visits[p].send.append(pending[key])
            if stage != DRIVER:
                visits[recv_at].recv.append(pending[key])
        msg = pending[key]
        msg.names += (name,)
        if stage != DRIVER and msg.receiver != at:
            visits[msg.receiver].keep.add(name)
        holders[name].add(stage)

    for v in visits:
        written: set[str] = set()
        for name in v.ops:
            for r in sig[name].reads:
                if r not in written:
                    need(r, v.stage, v.index)
            for w in sig[name].writes:
                written.add(w)
        for w in written:
            holders[w], writer[w] = {v.stage}, v.index
    for name in outputs:
        need(name, DRIVER, len(visits))
    for v in visits:  # receive in producer order: the order each FIFO channel delivers
        v.recv.sort(key=lambda m: m.producer)
    return StageGraph(visits, stages, outputs)
