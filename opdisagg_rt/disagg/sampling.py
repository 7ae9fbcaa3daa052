"""Sampling on the stage that owns `lm_head` (as vLLM samples on its last pipeline rank).

The engine sends each micro-batch's per-row sampling parameters with the step metadata (to that
stage only) and gets back token ids (and the logprobs asked for): the [rows, vocab] float32 logits
never leave the stage. The stage runs the engine's own `Sampler`, so the semantics are the same:

- greedy rows: argmax of the same logits;
- seeded rows: the request's generator (`make_generator(seed)`) lives on the stage from the
  request's first sampled step until it finishes, advancing exactly as the engine's would
  (also across preemption), so tokens do not depend on batch, micro-batch or stream;
- unseeded random rows draw from the stage sampler's generator, seeded like the engine's
  `Sampler(seed)` (spec key `sample_seed`, default 0 = Engine's default seed; stream k uses
  seed + k). Within-step micro-batches sample in row order from one generator, which draws the
  same uniforms as one call over the whole step;
- penalties and min_tokens: the rows that use them carry their prompt/output token ids (only
  those rows, as one int64 tensor), the rest carry nothing.
"""
from __future__ import annotations

import json

import torch

from opdisagg_rt.sampling import Sampler, SamplerOutput, SamplingParams, make_generator

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
          "seed", "min_tokens", "stop_token_ids", "ignore_eos", "logprobs")


class SampleEncoder:
    """Engine side: per micro-batch, the header entry (and token-history tensor) for the stage."""

    def __init__(self):
        self.gen_keys: dict[str, tuple[object, int]] = {}  # request id -> (request, generator key on the stage)
        self.next_key = 0
        self.drops: list[int] = []  # generator keys of finished requests, sent with the next step

    def encode(self, scheduled) -> tuple[dict, list[torch.Tensor]]:
        rows = [s.request for s in scheduled if s.samples]
        if self.gen_keys:
            for rid, (req, key) in list(self.gen_keys.items()):
                if req.is_finished:
                    self.drops.append(key)
                    del self.gen_keys[rid]
        table: list[dict] = []
        kinds: dict[int, tuple[int, bool, bool, bool]] = {}  # id(params) -> (index, seeded random, history, rep)
        pidx, gens, hist_rows, hist = [], [], [], []
        any_gen = any_hist = False
        for r in rows:
            p = r.sampling_params
            k = kinds.get(id(p))
            if k is None:
                k = kinds[id(p)] = (len(table), p.seed is not None and not p.greedy,
                                    bool(p.has_penalties or p.min_tokens), p.repetition_penalty != 1.0)
                table.append({f: getattr(p, f) for f in FIELDS})
            pidx.append(k[0])
            key = -1
            if k[1]:
                any_gen = True
                ent = self.gen_keys.get(r.request_id)
                if ent is None or ent[0] is not r:  # a new request (ids may be reused after a finish)
                    if ent is not None:
                        self.drops.append(ent[1])
                    ent = self.gen_keys[r.request_id] = (r, self.next_key)
                    self.next_key += 1
                key = ent[1]
            gens.append(key)
            if k[2]:
                any_hist = True
                prompt = r.prompt_token_ids if k[3] else []
                hist_rows.append([len(prompt), len(r.output_token_ids)])
                hist += prompt
                hist += r.output_token_ids
            else:
                hist_rows.append(None)
        info: dict = {"p": table, "r": pidx}
        if any_gen:
            info["g"] = gens
        tensors = []
        if any_hist:
            info["h"] = hist_rows
            tensors.append(torch.tensor(hist, dtype=torch.long))
        if self.drops:
            info["drop"], self.drops = self.drops, []
        return info, tensors


class StageSampler:
    """Stage side: the engine's Sampler over this stage's logits. One per stream; the seeded
    generators (keyed by the engine) are shared by the streams of the worker."""

    def __init__(self, seed: int, eos_token_ids: list[int], generators: dict[int, torch.Generator]):
        self.sampler = Sampler(seed)
        self.eos = list(eos_token_ids)
        self.gens = generators
        self.params: dict[str, SamplingParams] = {}

    def _params(self, fields: dict) -> SamplingParams:
        key = json.dumps(fields, sort_keys=True)
        p = self.params.get(key)
        if p is None:
            if len(self.params) > 1024:
                self.params.clear()
            p = self.params[key] = SamplingParams(**fields)
        return p

    def sample(self, logits: torch.Tensor, info: dict, hist: torch.Tensor | None) -> dict:
        """-> the header to send the engine: {"tok": [...], "lp": [...] or None}."""
        for key in info.get("drop", ()):
            self.gens.pop(key, None)
        table = [self._params(f) for f in info["p"]]
        params = [table[i] for i in info["r"]]
        gens = None
        if "g" in info:
            gens = []
            for key, p in zip(info["g"], params):
                if key < 0:
                    gens.append(None)
                    continue
                g = self.gens.get(key)
                if g is None:
                    g = self.gens[key] = make_generator(p.seed)
                gens.append(g)
        prompt_ids = output_ids = None
        if "h" in info:
            flat = hist.tolist() if hist is not None else []
            prompt_ids, output_ids, off = [], [], 0
            for h in info["h"]:
                if h is None:
                    prompt_ids.append([])
                    output_ids.append([])
                    continue
                prompt_ids.append(flat[off:off + h[0]])
                output_ids.append(flat[off + h[0]:off + h[0] + h[1]])
                off += h[0] + h[1]
        out = self.sampler.sample(logits, params, prompt_ids, output_ids, gens, self.eos)
        return {"tok": out.token_ids, "lp": out.logprobs}


def merge_outputs(headers: list[dict]) -> SamplerOutput:
    """The micro-batches' replies, in row order, as one SamplerOutput."""
    tokens: list[int] = []
    lps: list | None = None
    for i, h in enumerate(headers):
        tokens += h["tok"]
        if h.get("lp") is not None:
            if lps is None:
                lps = [None] * (len(tokens) - len(h["tok"]))
            lps += h["lp"]
        elif lps is not None:
            lps += [None] * len(h["tok"])
    return SamplerOutput(tokens, lps)
