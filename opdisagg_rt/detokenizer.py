"""Incremental detokenization, stop conditions and streamed text for one request.

Three layers, usable alone:
  IncrementalDetokenizer.push(token) -> text delta (never a half-finished UTF-8 character)
  find_stop / check_stop             -> pure functions deciding whether and where a request stops
  RequestStream                      -> the per-request object the engine keeps: token ids, text
                                        (already truncated at a stop string), finish/stop reason,
                                        and stream deltas that never leak part of a stop string.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

from opdisagg_rt.sampling import SamplingParams

# Prompt tokens kept as decode context: enough for tokenizers whose decoders treat the first token
# specially (SentencePiece drops a leading space) and for multi-token characters.
_CONTEXT = 5
_PARTIAL = "\ufffd"  # what decode() yields for an incomplete UTF-8 sequence


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Decodes a small window: ids[prefix:read] is text already emitted (kept only as context),
    ids[read:] are tokens not yet emitted. A delta is emitted when the window decodes to more text
    than its context and does not end in U+FFFD (a character split across tokens); otherwise the
    token waits for the next one.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)  # decode of ids[:read], cached between emits
        self.text = ""  # all output text emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_PARTIAL):
            return ""
        delta = new_text[len(self._prefix_text):]
        # Slide the window: the just-read tokens become the context; older ids are dropped.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self.text += delta
        return delta


def find_stop(text: str, new_len: int, stops: Sequence[str], include: bool) -> tuple[int, str] | None:
    """Find a stop string ending inside the last `new_len` chars of `text` (it may start earlier,
    spanning deltas). Returns (length to truncate `text` to, matched stop) for the earliest match,
    or None. With `include` the stop string is kept in the output."""
    if not new_len or not stops:
        return None
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, len(text) - new_len - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return None
    i, s = best
    return (i + len(s) if include else i), s


class Finish(NamedTuple):
    reason: str  # "stop" or "length"
    stop_reason: int | str | None  # vLLM's stop_reason: the stop token id or stop string; None for eos/length
    text_len: int  # truncate the output text to this many chars


def check_stop(
    output_ids: Sequence[int],
    params: SamplingParams,
    eos_token_ids: Sequence[int] = (),
    text: str = "",
    new_len: int = 0,
    *,
    num_prompt_tokens: int = 0,
    max_model_len: int | None = None,
) -> Finish | None:
    """Decide whether a request finishes after its last token. `text` is the output text including
    the last token's delta of `new_len` chars.

    eos (unless ignore_eos) and stop_token_ids only count once min_tokens are out (the sampler
    masks them before that anyway); their text is dropped unless include_stop_str_in_output.
    A stop token or string on the last allowed token reports "stop", not "length".
    """
    n = len(output_ids)
    if n and n >= params.min_tokens:
        last = output_ids[-1]
        drop = len(text) if params.include_stop_str_in_output else len(text) - new_len
        if not params.ignore_eos and last in eos_token_ids:
            return Finish("stop", None, drop)
        if last in params.stop_token_ids:
            return Finish("stop", last, drop)
    if params.stop and n > params.min_tokens:
        hit = find_stop(text, new_len, params.stop, params.include_stop_str_in_output)
        if hit is not None:
            return Finish("stop", hit[1], hit[0])
    if (params.max_tokens is not None and n >= params.max_tokens) or (
        max_model_len is not None and num_prompt_tokens + n >= max_model_len
    ):
        return Finish("length", None, len(text))
    return None


class RequestStream:
    """Per-request output state: feed sampled tokens with append(); read token_ids, text,
    finish_reason, stop_reason; pull stream deltas with pop_delta().

    `tokenizer=None` gives token-only output (text stays ""); stop strings then can't match.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
        max_model_len: int | None = None,
    ):
        if tokenizer is None and params.stop:
            raise ValueError("SamplingParams.stop needs a tokenizer to detokenize the output")
        self.params = params
        self.eos_token_ids = tuple(eos_token_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.max_model_len = max_model_len
        self.detok = (
            None if tokenizer is None else IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        )
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._sent = 0  # chars of text already handed out by pop_delta()
        # A streamed delta must not show the start of a stop string that a later token would cut.
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        if params.include_stop_str_in_output:
            self._holdback = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> str | None:
        """Record one sampled token; returns the finish reason if the request is now done."""
        assert self.finish_reason is None, "append() after the request finished"
        self.token_ids.append(token_id)
        delta = self.detok.push(token_id) if self.detok is not None else ""
        self.text += delta
        fin = check_stop(
            self.token_ids, self.params, self.eos_token_ids, self.text, len(delta),
            num_prompt_tokens=self.num_prompt_tokens, max_model_len=self.max_model_len,
        )
        if fin is not None:
            self.finish_reason, self.stop_reason = fin.reason, fin.stop_reason
            self.text = self.text[: fin.text_len]
        return self.finish_reason

    def pop_delta(self) -> str:
        """Text not yet streamed. While running, the last len(longest stop)-1 chars are held back."""
        end = len(self.text) if self.finished else max(self._sent, len(self.text) - self._holdback)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
