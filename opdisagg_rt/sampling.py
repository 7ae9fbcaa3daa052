"""Sampling parameters and the batched sampler (vLLM v1 semantics).

Order of transforms, as vLLM v1 applies them:
  raw logprobs (if asked) -> min_tokens mask -> repetition/presence/frequency penalties
  -> greedy rows: argmax -> temperature -> min-p -> top-k -> top-p -> inverse-CDF sample.
Every transform is one torch op over the whole batch with per-row parameter tensors; a row whose
knob is disabled gets the neutral value (penalty 1, min_p 0, top_k = vocab) or is left out of the
row subset the op runs on, so it passes through untouched.
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


@dataclass(slots=True)
class Presampled:
    """What a runner hands the engine instead of logits when the tokens were already sampled
    where the logits are: the disaggregated stage that owns `lm_head` runs this same Sampler
    (opdisagg_rt.disagg.sampling), so the logits never leave it. Sampler.sample returns `output`."""
    output: SamplerOutput


def make_generator(seed: int) -> torch.Generator:
    """A per-request generator; the engine keeps it with the request across steps."""
    return torch.Generator().manual_seed(seed)


def _pairs(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row token lists into (row, token) index tensors."""
    lens = torch.tensor([len(x) for x in lists])
    toks = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lists)), lens), toks


# Vocab blocks for two-level reductions. On the CPU torch's last-dim argmax and a full-vocab
# exponential_/cumsum are slow (32x49152: argmax ~4.5 ms vs amax ~0.4 ms; exponential_ ~60 ms),
# so greedy and sampling first reduce per block (vectorized amax/sum), then work inside one block.
_BLOCK = 256
# top-p looks for its cut among this many top tokens first; rows whose candidates hold less
# than top_p of the mass fall back to a full sort (32x49152: topk(1024) ~25 ms, sort ~200 ms).
_TOP_P_CANDIDATES = 1024
_MIN_LOGIT = -80.0  # exp(-80) ~ 1.8e-35: still a normal float32


def _blocks(x: torch.Tensor, fill: float) -> torch.Tensor:
    """[n, V] -> [n, V/B, B]; a view unless V is not a multiple of B (then padded with `fill`)."""
    pad = -x.shape[1] % _BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(x.shape[0], -1, _BLOCK)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) (same result, first index on ties), several times faster on the CPU."""
    n, v = x.shape
    if v < 4 * _BLOCK:
        return x.argmax(dim=-1)
    b = _blocks(x, float("-inf"))
    blk = b.amax(dim=-1).argmax(dim=-1)
    return blk * _BLOCK + b[torch.arange(n), blk].argmax(dim=-1)


def _top_p(e: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but the smallest top set whose mass reaches top_p: a token is dropped once the
    mass ranked before it is >= top_p (the top token always survives). e: unnormalized probs."""

    def nucleus(e: torch.Tensor, cut: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        vals, idx = e.topk(k, dim=-1) if k < e.shape[1] else e.sort(dim=-1, descending=True)
        cum = vals.cumsum(dim=-1)
        vals = vals.masked_fill(cum - vals >= cut, 0.0)
        return torch.zeros_like(e).scatter_(1, idx, vals), cum[:, -1:]

    cut = top_p * e.sum(dim=-1, keepdim=True)
    out, mass = nucleus(e, cut, min(_TOP_P_CANDIDATES, e.shape[1]))
    # Per-row fallback (decided by the row's own data, so batch-mates never change a row's result).
    short = (mass < cut).squeeze(1).nonzero().squeeze(1)
    if short.numel():
        out[short] = nucleus(e[short], cut[short], e.shape[1])[0]
    return out


def _sample_inverse_cdf(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample a token per row from unnormalized probs e with one uniform u in [0, 1) per row: pick
    the block whose cumulative mass passes u, then the token inside it (float64 cumsums; tokens
    with zero mass can never be picked)."""
    n = e.shape[0]
    e = _blocks(e, 0.0)
    bcdf = e.sum(dim=-1).double().cumsum(dim=-1)  # [n, blocks]; a float64 sum would copy e
    target = (u * bcdf[:, -1]).unsqueeze(1)  # < total mass
    b = torch.searchsorted(bcdf, target, right=True).clamp_(max=bcdf.shape[1] - 1)
    rest = target - torch.where(b > 0, bcdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = e[torch.arange(n), b.squeeze(1)].double().cumsum(dim=-1)  # [n, B]
    # Summation order differs between the block sum and this cumsum: stay strictly below the
    # block's mass so the search lands on a token with nonzero probability.
    rest = torch.minimum(rest, torch.nextafter(inner[:, -1:], torch.zeros(())))
    return (b * _BLOCK + torch.searchsorted(inner, rest, right=True)).squeeze(1)


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
        if isinstance(logits, Presampled):  # sampled on the stage that holds the logits
            assert len(logits.output.token_ids) == len(params), \
                f"{len(logits.output.token_ids)} presampled rows but {len(params)} SamplingParams"
            return logits.output
        n = logits.shape[0]
        assert len(params) == n, f"{n} logits rows but {len(params)} SamplingParams"
        if n == 0:
            return SamplerOutput([], None)
        logprobs = self._logprobs(logits, params) if any(p.logprobs is not None for p in params) else None

        min_tok: list[int] = []
        if any(p.min_tokens for p in params):
            if output_ids is None:
                raise ValueError("Sampler.sample: min_tokens needs output_ids")
            min_tok = [i for i, p in enumerate(params) if len(output_ids[i]) < p.min_tokens]
        if not min_tok and all(p.greedy and not p.has_penalties for p in params):
            # Fast path (the benchmark case): plain argmax, no copy of the logits.
            tokens = argmax(logits).tolist()
            return SamplerOutput(tokens, self._finish_logprobs(logprobs, tokens, params))

        x = logits.float()
        if (min_tok or any(p.has_penalties for p in params)) and x is logits:
            # The min_tokens mask and the penalties work in place: never touch the caller's logits.
            x = x.clone(memory_format=torch.contiguous_format)
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
        tokens = argmax(x) if any(greedy) else None
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
        """In place on x; works on the (row, token) pairs seen, never on [rows, vocab] masks."""
        if output_ids is None:
            raise ValueError("Sampler.sample: penalties need output_ids")
        rep = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in rep):
            if prompt_ids is None:
                raise ValueError("Sampler.sample: repetition_penalty needs prompt_ids")
            # Only rows that use the penalty pay for their token lists. Duplicate pairs write the
            # same value, so no dedup is needed.
            rows, toks = _pairs([prompt_ids[i] + output_ids[i] if r != 1.0 else [] for i, r in enumerate(rep)])
            val, r = x[rows, toks], torch.tensor(rep)[rows]
            # Dividing a positive logit / multiplying a negative one both make the token less likely.
            x[rows, toks] = torch.where(val > 0, val / r, val * r)
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        if any(freq) or any(pres):
            rows, toks = _pairs([o if f or q else [] for o, f, q in zip(output_ids, freq, pres)])
            x.index_put_((rows, toks), -torch.tensor(freq)[rows], accumulate=True)  # once per occurrence
            flat = torch.unique(rows * x.shape[1] + toks)  # once per distinct token
            x.view(-1).index_put_((flat,), -torch.tensor(pres)[flat // x.shape[1]], accumulate=True)
        return x

    def _random(self, x: torch.Tensor, params: list[SamplingParams], gens) -> torch.Tensor:
        n, v = x.shape
        # Work on unnormalized probabilities e = exp((x - max) / T), max 1: one exp for every
        # transform below, and masking is zeroing. exp on very negative inputs hits the CPU's slow
        # denormal path (10-30x slower), so tokens below e^-80 of the top one are set to 0 directly.
        temp = torch.tensor([p.temperature for p in params]).unsqueeze(1)
        d = (x - x.amax(dim=-1, keepdim=True)).div_(temp)
        tiny = d < _MIN_LOGIT
        e = d.clamp_(min=_MIN_LOGIT).exp_().masked_fill_(tiny, 0.0)

        if any(p.min_p > 0 for p in params):
            # p_i < min_p * p_max  <=>  e_i < min_p.
            e.masked_fill_(e < torch.tensor([p.min_p for p in params]).unsqueeze(1), 0.0)

        ks = [p.top_k if 0 < p.top_k < v else v for p in params]
        if any(k < v for k in ks):
            # A threshold at the k-th largest value (ties with it are kept, as in vLLM).
            kmax = max(k for k in ks if k < v)
            kth = e.topk(kmax, dim=-1).values.gather(1, (torch.tensor(ks).clamp(max=kmax) - 1).unsqueeze(1))
            kth[torch.tensor(ks) >= v] = 0.0  # disabled rows keep everything
            e.masked_fill_(e < kth, 0.0)

        rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if rows:
            tp = torch.tensor([params[i].top_p for i in rows]).unsqueeze(1)
            if len(rows) == n:
                e = _top_p(e, tp)
            else:
                e[rows] = _top_p(e[rows], tp)

        # One uniform per row; seeded rows draw theirs from their own generator, so their tokens
        # do not depend on batch size or position. Unseeded rows share the engine generator.
        u = torch.rand(n, dtype=torch.float64, generator=self.generator)
        for i, g in enumerate(gens or ()):
            if g is not None:
                u[i] = torch.rand((), dtype=torch.float64, generator=g)
        return _sample_inverse_cdf(e, u)

    # -- logprobs ---------------------------------------------------------------------------------

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: list[SamplingParams]):
        # logprob = logit - logsumexp: no full log_softmax tensor is materialized.
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        x = (logits if len(rows) == len(params) else logits[rows]).float()
        lse = x.logsumexp(dim=-1, keepdim=True)
        k = max(params[i].logprobs for i in rows)
        top = x.topk(k, dim=-1) if k else None
        return rows, x, lse, top

    @staticmethod
    def _finish_logprobs(state, tokens: list[int], params: list[SamplingParams]):
        if state is None:
            return None
        rows, x, lse, top = state
        sampled = (x.gather(1, torch.tensor([tokens[i] for i in rows]).unsqueeze(1)) - lse).squeeze(1).tolist()
        top_v, top_i = ((top.values - lse).tolist(), top.indices.tolist()) if top is not None else (None, None)
        out: list[list[tuple[int, float]] | None] = [None] * len(params)
        for j, i in enumerate(rows):
            k = params[i].logprobs
            entry = [(tokens[i], sampled[j])]
            if k:
                entry += list(zip(top_i[j][:k], top_v[j][:k]))
            out[i] = entry
        return out
