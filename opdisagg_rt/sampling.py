"""Sampling parameters and the batched sampler (vLLM v1 semantics).

Order of transforms, as vLLM v1 applies them:
  raw logprobs (if asked) -> min_tokens mask -> repetition/presence/frequency penalties
  -> greedy rows: argmax -> temperature -> min-p -> top-k/top-p -> exponential-race sample.
Every transform is one torch op over the whole batch with per-row parameter tensors; a row whose
knob is disabled gets the neutral value (penalty 1, top_p inf, ...) so it passes through untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import torch

_EPS = 1e-5  # temperature below this is greedy (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled (-1 is normalized to 0)
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output tokens
    presence_penalty: float = 0.0  # over output tokens
    frequency_penalty: float = 0.0  # over output tokens
    seed: int | None = None
    max_tokens: int | None = 16  # None: until eos or max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None  # normalized to list[str]
    stop_token_ids: list[int] | None = None  # normalized to list[int]
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0: the sampled token only)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(field: str, value, want: str):
            raise ValueError(f"SamplingParams.{field} must be {want}, got {value!r}")

        if not _is_num(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "a non-negative number")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", self.top_k, "an int: 0 or -1 (disabled) or >= 1")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "in [0, 1]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        for f in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, f)
            if not _is_num(v) or not -2 <= v <= 2:
                bad(f, v, "in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", self.seed, "an int or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", self.logprobs, f"an int in [0, {MAX_LOGPROBS}] or None")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", self.stop, "a non-empty string or a list of non-empty strings")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                bad("stop_token_ids", self.stop_token_ids, "a list of non-negative ints")

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Per row: None if the row did not ask for logprobs, else [(sampled_id, lp), (top1_id, lp), ...
    # (topn_id, lp)]: the sampled token first, then the top-n by raw logprob (the sampled token may
    # also appear among them, as in vLLM). Logprobs are log_softmax of the unprocessed logits.
    logprobs: list[list[tuple[int, float]] | None] | None = None


def make_generator(seed: int) -> torch.Generator:
    """A per-request generator; the engine keeps it with the request across steps."""
    return torch.Generator().manual_seed(seed)


def _counts(lists: list[list[int]], vocab: int) -> torch.Tensor:
    """[rows, vocab] int counts of each token id per row, in one bincount over a flat index."""
    lens = torch.tensor([len(x) for x in lists])
    flat = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(lists)), lens)
    return torch.bincount(row * vocab + flat, minlength=len(lists) * vocab).view(len(lists), vocab)


class Sampler:
    """Samples one token per row of a logits batch. Owns the shared generator for unseeded rows."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *args, **kwargs) -> SamplerOutput:
        return self.sample(*args, **kwargs)

    def sample(
        self,
        logits: torch.Tensor,  # [rows, vocab], any float dtype; never modified
        params: list[SamplingParams],
        prompt_ids: list[list[int]] | None = None,  # needed for repetition_penalty
        output_ids: list[list[int]] | None = None,  # needed for penalties and min_tokens
        generators: list[torch.Generator | None] | None = None,  # per-row seeded generators
        eos_token_ids: list[int] | tuple[int, ...] = (),  # masked (with stop_token_ids) under min_tokens
    ) -> SamplerOutput:
        n = logits.shape[0]
        assert len(params) == n, f"{n} logits rows but {len(params)} SamplingParams"
        logprobs = self._logprobs(logits, params) if any(p.logprobs is not None for p in params) else None

        min_tok: list[int] = []
        if any(p.min_tokens for p in params):
            if output_ids is None:
                raise ValueError("Sampler.sample: min_tokens needs output_ids")
            min_tok = [i for i, p in enumerate(params) if len(output_ids[i]) < p.min_tokens]
        if not min_tok and all(p.greedy and not p.has_penalties for p in params):
            # Fast path (the benchmark case): plain argmax, no copy of the logits.
            tokens = logits.argmax(dim=-1).tolist()
            return SamplerOutput(tokens, self._finish_logprobs(logprobs, tokens, params))

        x = logits.to(torch.float32, copy=True)
        if min_tok:
            rows, cols = [], []
            for i in min_tok:
                p = params[i]
                ids = p.stop_token_ids + ([] if p.ignore_eos else list(eos_token_ids))
                rows += [i] * len(ids)
                cols += ids
            x[rows, cols] = float("-inf")
        if any(p.has_penalties for p in params):
            x = self._penalize(x, params, prompt_ids, output_ids)

        greedy = [p.greedy for p in params]
        tokens = x.argmax(dim=-1) if any(greedy) else None
        rand = [i for i, g in enumerate(greedy) if not g]
        if rand:
            sub = [params[i] for i in rand]
            xs = x if len(rand) == n else x[rand]
            gens = None if generators is None else [generators[i] for i in rand]
            sampled = self._random(xs, sub, gens)
            if tokens is None:
                tokens = sampled
            else:
                tokens[rand] = sampled
        tokens = tokens.tolist()
        return SamplerOutput(tokens, self._finish_logprobs(logprobs, tokens, params))

    # -- transforms -------------------------------------------------------------------------------

    @staticmethod
    def _penalize(x: torch.Tensor, params, prompt_ids, output_ids) -> torch.Tensor:
        v = x.shape[1]
        if output_ids is None:
            raise ValueError("Sampler.sample: penalties need output_ids")
        rep = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in rep):
            if prompt_ids is None:
                raise ValueError("Sampler.sample: repetition_penalty needs prompt_ids")
            # Only rows that use the penalty pay for building their token set.
            seen = _counts([prompt_ids[i] + output_ids[i] if r != 1.0 else [] for i, r in enumerate(rep)], v) > 0
            scale = torch.where(seen, torch.tensor(rep).unsqueeze(1), 1.0)
            # Dividing a positive logit / multiplying a negative one both make the token less likely.
            x = torch.where(x > 0, x / scale, x * scale)
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        if any(freq) or any(pres):
            counts = _counts([o if f or q else [] for o, f, q in zip(output_ids, freq, pres)], v).to(x.dtype)
            x = x - torch.tensor(freq).unsqueeze(1) * counts - torch.tensor(pres).unsqueeze(1) * (counts > 0)
        return x

    def _random(self, x: torch.Tensor, params: list[SamplingParams], gens) -> torch.Tensor:
        n, v = x.shape
        x = x / torch.tensor([p.temperature for p in params]).unsqueeze(1)

        if any(p.min_p > 0 for p in params):
            # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
            log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params])
            x = x.masked_fill(x < x.amax(dim=-1, keepdim=True) + log_min_p.unsqueeze(1), float("-inf"))

        # Top-k is a threshold (ties with the k-th logit are kept) in both branches, so a row's
        # result never depends on which branch its batch-mates pushed the batch into.
        ks = [p.top_k if 0 < p.top_k < v else v for p in params]
        use_k = any(k < v for k in ks)
        if any(p.top_p < 1.0 for p in params):
            srt, idx = x.sort(dim=-1, descending=True)
            if use_k:
                kth = srt.gather(1, torch.tensor(ks).unsqueeze(1) - 1)
                srt = srt.masked_fill(srt < kth, float("-inf"))
            probs = srt.softmax(dim=-1)
            # Drop a token once the mass strictly before it already reaches top_p; the first token
            # always survives. Disabled rows get +inf so float rounding of the cumsum can't bite.
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in params]).unsqueeze(1)
            srt = srt.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
            x = torch.empty_like(x).scatter_(1, idx, srt)
        elif use_k:
            kmax = max(k for k in ks if k < v)
            top = x.topk(kmax, dim=-1).values
            kth = top.gather(1, (torch.tensor(ks).clamp(max=kmax) - 1).unsqueeze(1))
            kth[torch.tensor(ks) >= v] = float("-inf")  # disabled rows keep everything
            x = x.masked_fill(x < kth, float("-inf"))

        probs = x.softmax(dim=-1)
        # Exponential race: argmax(p_i / E_i), E_i ~ Exp(1), is an exact sample from p. Each seeded
        # row draws exactly `vocab` numbers from its own generator per step, so its tokens do not
        # depend on batch size or position; unseeded rows share the engine generator.
        q = torch.empty_like(probs)
        seeded = [] if gens is None else [i for i, g in enumerate(gens) if g is not None]
        if len(seeded) < n:
            q.exponential_(generator=self.generator)
        for i in seeded:
            q[i].exponential_(generator=gens[i])
        return probs.div_(q.clamp_min_(1e-30)).argmax(dim=-1)  # clamp: 0/0 would be NaN, and NaN wins argmax

    # -- logprobs ---------------------------------------------------------------------------------

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: list[SamplingParams]):
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        lp = logits[rows].float().log_softmax(dim=-1)
        k = max(params[i].logprobs for i in rows)
        top = lp.topk(k, dim=-1) if k else None
        return rows, lp, top

    @staticmethod
    def _finish_logprobs(state, tokens: list[int], params: list[SamplingParams]):
        if state is None:
            return None
        rows, lp, top = state
        sampled = lp.gather(1, torch.tensor([tokens[i] for i in rows]).unsqueeze(1)).squeeze(1).tolist()
        top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else (None, None)
        out: list[list[tuple[int, float]] | None] = [None] * len(params)
        for j, i in enumerate(rows):
            k = params[i].logprobs
            entry = [(tokens[i], sampled[j])]
            if k:
                entry += list(zip(top_i[j][:k], top_v[j][:k]))
            out[i] = entry
        return out
