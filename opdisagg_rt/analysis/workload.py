"""One engine step as the cost model sees it: groups of sequences with new and already-cached tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("prefill", "decode", "mixed")


@dataclass(slots=True)
class SeqGroup:
    count: float  # sequences (fractional when a context distribution splits the batch)
    new: int  # tokens computed this step per sequence
    past: int  # tokens already in the KV cache / state per sequence


@dataclass(slots=True)
class Workload:
    phase: str = "decode"
    batch: int = 1
    context: list[tuple[int, float]] = field(default_factory=lambda: [(2048, 1.0)])  # (length, weight)
    prefix: int = 0  # prefill: tokens of each prompt already cached (prefix hits)
    chunk: int = 0  # prefill chunk size (0 = whole prompt in one step); mixed: prefill tokens per step
    moe_imbalance: float = 1.0  # busiest expert's load / mean load, applied when experts span devices

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"workload phase must be one of {PHASES}, got {self.phase!r}")
        if self.batch < 1:
            raise ValueError(f"workload batch must be >= 1, got {self.batch}")
        total = sum(w for _, w in self.context)
        if not self.context or total <= 0 or any(l < 1 for l, _ in self.context):
            raise ValueError(f"workload context must be positive lengths with positive weights, got {self.context}")
        self.context = [(int(l), w / total) for l, w in self.context]

    def groups(self) -> list[SeqGroup]:
        if self.phase == "decode":
            return [SeqGroup(self.batch * w, 1, l - 1) for l, w in self.context]
        if self.phase == "prefill":
            return [SeqGroup(self.batch * w, l - min(self.prefix, l - 1), min(self.prefix, l - 1)) for l, w in self.context]
        # mixed (chunked prefill piggybacking on decode, as vLLM schedules it): the decode batch
        # plus one prompt chunk of `chunk` tokens midway through a prompt of the mean context
        mean = int(sum(l * w for l, w in self.context))
        c = self.chunk or 512
        return [SeqGroup(self.batch * w, 1, l - 1) for l, w in self.context] + [SeqGroup(1, c, max(mean // 2, self.prefix))]

    @property
    def tokens(self) -> float:
        """Tokens through the GEMMs this step."""
        return sum(g.count * g.new for g in self.groups())

    @property
    def logit_rows(self) -> float:
        """Rows that need logits: every decode token, the last token of each prompt."""
        return sum(g.count for g in self.groups())

    @property
    def output_tokens(self) -> float:
        """Tokens generated per step (decode) or prompt tokens processed (prefill), for tokens/s."""
        if self.phase == "prefill":
            return self.tokens
        return sum(g.count for g in self.groups() if g.new == 1)

    def scaled(self, frac: float) -> "Workload":
        """A micro-batch carrying `frac` of the sequences (same lengths)."""
        w = Workload(self.phase, 1, list(self.context), self.prefix, self.chunk, self.moe_imbalance)
        w.batch = self.batch * frac  # fractional on purpose: costs are linear in the sequence count
        return w


def parse_context(text: str) -> list[tuple[int, float]]:
    """'8192' or a distribution '1024:0.7,8192:0.3' (length:weight pairs)."""
    out = []
    for part in str(text).split(","):
        length, _, weight = part.partition(":")
        try:
            out.append((int(length), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"bad --context entry {part!r}: expected LENGTH or LENGTH:WEIGHT") from None
    return out
