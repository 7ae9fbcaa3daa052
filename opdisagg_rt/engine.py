"""Engine: the user-facing API. `generate()` for batches, `stream()` for deltas, and
`add_request()`/`step()` for serving stacks that drive the loop themselves."""
from __future__ import annotations

import gc
import itertools
import logging
import os
import time
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from opdisagg_rt.cache.kv_cache_manager import KVCacheManager
from opdisagg_rt.config import EngineConfig
from opdisagg_rt.detokenizer import RequestStream
from opdisagg_rt.model_runner import ModelRunner, kv_cache_budget
from opdisagg_rt.models.loader import LoadedModel, load_model
from opdisagg_rt.models.registry import build_model_ops
from opdisagg_rt.outputs import RequestMetrics, RequestOutput
from opdisagg_rt.sampling import Sampler, SamplingParams, make_generator
from opdisagg_rt.scheduler.request import Request, RequestStatus
from opdisagg_rt.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Text, token ids, a chat (list of messages), or vLLM's prompt dicts: {"prompt": text} or
# {"prompt_token_ids": ids}, each with an optional "cache_salt".
Prompt = str | list[int] | list[dict[str, Any]] | dict[str, Any]
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


class Engine:
    def __init__(self, model: str | LoadedModel | None = None, dtype: str = "bfloat16", max_model_len: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 kv_cache_memory: float | int = 0.1, enable_prefix_caching: bool = True,
                 num_threads: int | None = None, seed: int = 0,
                 kv_store=None, kv_store_size: int | None = None, kv_store_chunk_size: int = 256,
                 kv_store_salt: str | None = None, stage_spec=None):
        self.config = cfg = EngineConfig(getattr(model, "source", model), dtype, max_model_len, max_num_seqs, max_num_batched_tokens,
                                         block_size, kv_cache_memory, enable_prefix_caching, num_threads, seed)
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported on the CPU (use one of {sorted(DTYPES)})")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.dtype = DTYPES[dtype]
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.model_config, self.tokenizer, self.fingerprint = loaded.config, loaded.tokenizer, loaded.fingerprint
        limit = loaded.config.max_position_embeddings
        self.max_model_len = max_model_len or min(limit, 8192)
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}")
        # A stage spec runs the operations on stage worker processes (opdisagg_rt.disagg).
        if stage_spec is not None:
            from opdisagg_rt.disagg.executor import DisaggRunner
            self.runner = DisaggRunner(loaded, stage_spec, block_size, self.dtype, self.max_model_len,
                                       max_num_batched_tokens, max_num_seqs)
        else:
            self.runner = ModelRunner(build_model_ops(loaded, self.dtype, self.max_model_len), block_size, self.dtype,
                                      max_num_seqs=max_num_seqs)
        del loaded
        num_blocks = self.runner.allocate_kv_cache(kv_cache_budget(kv_cache_memory))
        # kv_spec: KV cache groups (sliding-window layers) and linear-attention state pool
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching,
                                 hash_extra=f"{self.fingerprint}:{dtype}".encode(),
                                 spec=getattr(self.runner, "kv_spec", None))
        # kvstore hook: the external KV store ("cpu", "disk:DIR", "redis://...", a list of them).
        self.kv_connector = None
        if kv_store is not None:
            from opdisagg_rt.kvstore import make_connector
            self.kv_connector = make_connector(self, kv_store, kv_store_size, kv_store_chunk_size, kv_store_salt)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                                   connector=self.kv_connector)
        if stage_spec is not None:  # disagg: `streams: true` runs one scheduler per micro-batch stream
            self.scheduler = self.runner.wrap_scheduler(self.scheduler)
        self.sampler = Sampler(seed)
        self.eos_token_ids = list(self.tokenizer.eos_token_ids or self.model_config.eos_token_ids)
        self._streams: dict[str, RequestStream] = {}
        self._logprobs: dict[str, list[dict[int, float]]] = {}
        self._ids = itertools.count()
        # torch's thread count is per process; each step restores this engine's own (the
        # disaggregated runner drops the engine process to 1 when its stages take every core), so
        # a second engine in the process (a bench peer, an embedding stack's) cannot change it.
        self.num_threads = torch.get_num_threads()
        # The startup heap (tokenizer tables, weights' Python wrappers: ~185k objects for SmolLM2)
        # lives as long as the engine; freezing it keeps every full collection from rescanning it,
        # which cost ~10% of a decode step (measured; vLLM's engine core does the same).
        gc.collect()
        gc.freeze()

    # -- requests -----------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ValueError(f"prompt must be text, a list of token ids or a list of chat messages (dicts), "
                         f"got {type(prompt).__name__}")

    def _make_request(self, prompt: Prompt, params: SamplingParams | None, request_id: str | None,
                      cache_salt: str | None = None) -> Request:
        """Everything that can be wrong with a request is found here, before it joins the batch."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        prompt, cache_salt = self._unpack_prompt(prompt, cache_salt)
        ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty (0 tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len={self.max_model_len} leaves "
                             f"no room to generate (the prompt must be shorter than max_model_len)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        gen = make_generator(params.seed) if params.seed is not None else None
        return Request(request_id, ids, params, prompt=prompt if isinstance(prompt, str) else None, generator=gen,
                       cache_salt=cache_salt)

    @staticmethod
    def _unpack_prompt(prompt: Prompt, cache_salt: str | None) -> tuple[Prompt, str | None]:
        """A vLLM prompt dict gives its prompt and its "cache_salt"; `cache_salt` (the argument)
        applies to any prompt form."""
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
            if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError("a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids' "
                                 f"(and optionally 'cache_salt'), got keys {sorted(prompt)}")
            salt = prompt.get("cache_salt")
            if salt is not None and cache_salt is not None and salt != cache_salt:
                raise ValueError(f"cache_salt={cache_salt!r} conflicts with the prompt's cache_salt={salt!r}")
            cache_salt = cache_salt if salt is None else salt
            prompt = prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string if given, got {cache_salt!r}")
        return prompt, cache_salt

    def _enqueue(self, req: Request) -> None:
        self._streams[req.request_id] = RequestStream(self.tokenizer, req.prompt_token_ids, req.sampling_params,
                                                      self.eos_token_ids, self.max_model_len)
        if req.sampling_params.logprobs is not None:
            self._logprobs[req.request_id] = []
        self.scheduler.add_request(req)

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue a request; `cache_salt` (tenant salt) keeps its KV from being shared with
        requests of another salt, in the prefix cache and in the KV store."""
        req = self._make_request(prompt, sampling_params, request_id, cache_salt)
        self._enqueue(req)
        return req.request_id

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._streams.pop(request_id, None)
        self._logprobs.pop(request_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler step: schedule, run the model, sample, detokenize. Returns an output
        (with the new delta) for every request that produced a token or finished."""
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        try:
            batch = self.runner.prepare(out.scheduled)
            logits = self.runner.execute(batch)
            rows = [s.request for s in out.scheduled if s.samples]
            sampled = self.sampler.sample(
                logits, [r.sampling_params for r in rows], [r.prompt_token_ids for r in rows],
                [r.output_token_ids for r in rows], [r.generator for r in rows], self.eos_token_ids)
        except Exception as e:  # a failed step fails its requests, never the engine
            logger.exception("step failed; failing its %d requests", len(out.scheduled))
            return [self._fail(s.request, f"{type(e).__name__}: {e}") for s in out.scheduled]
        tokens = {r.request_id: t for r, t in zip(rows, sampled.token_ids)}
        if sampled.logprobs is not None:
            for r, lp in zip(rows, sampled.logprobs):
                if lp is not None:
                    self._logprobs[r.request_id].append(dict(lp))
        outputs = []
        now = time.perf_counter()
        for req in self.scheduler.update_from_output(out, tokens):
            try:
                if req.first_token_time is None:
                    req.first_token_time = now
                stream = self._streams[req.request_id]
                reason = stream.append(req.output_token_ids[-1])
                if reason is not None:
                    self.scheduler.finish(req, RequestStatus(reason))
                outputs.append(self._output(req))
            except Exception as e:
                logger.exception("request %s failed in output processing", req.request_id)
                outputs.append(self._fail(req, f"{type(e).__name__}: {e}"))
        return outputs

    def _fail(self, req: Request, message: str) -> RequestOutput:
        req.error = message
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        return self._output(req)

    def _output(self, req: Request) -> RequestOutput:
        stream = self._streams.get(req.request_id)
        finished = req.is_finished
        text_delta = stream.pop_delta() if stream is not None else ""
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                 req.finished_time, req.num_prompt_tokens, len(req.output_token_ids),
                                 max(req.num_cached_tokens, 0), req.num_preemptions)
        if self.kv_connector is not None:  # kvstore hook: per-request store metrics
            metrics.num_store_tokens = self.kv_connector.request_store_tokens(req.request_id)
        token_ids = list(stream.token_ids) if stream is not None else list(req.output_token_ids)
        o = RequestOutput(
            req.request_id, req.prompt, req.prompt_token_ids, stream.text if stream else "", token_ids,
            finished, req.status.value if finished else None, stream.stop_reason if stream else None,
            self._logprobs.get(req.request_id), metrics, req.error, text_delta, token_ids[-1:])
        if finished:
            self._streams.pop(req.request_id, None)
            self._logprobs.pop(req.request_id, None)
        return o

    # -- convenience --------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order. Every prompt is checked before
        any runs, so one bad prompt raises ValueError and nothing is started. `cache_salt`
        applies to every prompt (or give each its own: {"prompt": ..., "cache_salt": ...})."""
        prompts = self._as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling_params")
        reqs = [self._make_request(p, sp, None, cache_salt) for p, sp in zip(prompts, params)]
        for r in reqs:
            self._enqueue(r)
        pending = {r.request_id: i for i, r in enumerate(reqs)}
        results: list[RequestOutput | None] = [None] * len(reqs)
        with tqdm(total=len(reqs), desc="generate", disable=not use_tqdm, leave=False) as bar:
            while pending:
                for o in self.step():
                    if o.finished and o.request_id in pending:
                        results[pending.pop(o.request_id)] = o
                        bar.update(1)
        return results  # type: ignore[return-value]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               cache_salt: str | None = None) -> Iterator[RequestOutput]:
        """Yield this request's outputs as tokens arrive (`text_delta` holds the new text);
        other requests in the engine advance meanwhile."""
        rid = self.add_request(prompt, sampling_params, cache_salt=cache_salt)
        while True:
            for o in self.step():
                if o.request_id == rid:
                    yield o
                    if o.finished:
                        return

    @staticmethod
    def _as_prompt_list(prompts) -> list[Prompt]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(
                isinstance(x, int) or (isinstance(x, dict) and "role" in x) for x in prompts):
            return [prompts]  # one prompt of token ids, or one chat (a list of prompt dicts is many)
        return list(prompts)

    def shutdown(self) -> None:
        for rid in list(self.scheduler.requests):
            self.abort(rid)
        if hasattr(self.runner, "shutdown"):  # disagg: stop stage workers, remove shared memory
            self.runner.shutdown()
        if self.kv_connector is not None:  # kvstore hook: finish queued stores, close tiers
            self.kv_connector.close()
            self.kv_connector = self.scheduler.connector = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
