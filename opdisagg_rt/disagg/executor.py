"""DisaggRunner: the ModelRunner interface (prepare / execute / allocate_kv_cache) over stage
worker processes, as a stage spec places the operations.

Per step the engine sends each stage the step's metadata once per micro-batch (metadata
caching); the stages then exchange only activations, and the stage that runs `lm_head` samples
(the engine's Sampler, with each row's sampling parameters sent along with the metadata) and
returns token ids, so the logits never cross (spec `sample_on_stage: false` returns the logits
for the engine to sample instead). A one-stage spec on this host runs in the engine process
exactly like ModelRunner.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as tmp

from opdisagg_rt.disagg.graph import DRIVER, OpSig, build_graph
from opdisagg_rt.disagg.sampling import merge_outputs
from opdisagg_rt.disagg.meta import DisaggBatch, encode_batch, metadata_bytes, split_micro_batches
from opdisagg_rt.disagg.spec import StageSpec, parse_stage_spec
from opdisagg_rt.disagg.transport import PeerGone
from opdisagg_rt.disagg.transport.shm import ShmRing, ShmSegment, new_name, sweep_stale
from opdisagg_rt.disagg.weights import dumps, export_weights, meta_ops
from opdisagg_rt.disagg.worker import (FAILED, READY, S_PID, S_STATE, S_STEP, S_UNIT, STATUS_BYTES, Status,
                                       worker_main)
from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.cache.kv_cache_manager import KVCacheSpec
from opdisagg_rt.cache.state_pool import StatePool, state_specs
from opdisagg_rt.model_runner import ModelRunner
from opdisagg_rt.models.executor import run_ops
from opdisagg_rt.models.loader import LoadedModel
from opdisagg_rt.models.registry import build_model_ops
from opdisagg_rt.sampling import Presampled

logger = logging.getLogger(__name__)


class StageFailure(RuntimeError):
    """A stage worker died, hung or raised: the step (and the runtime) cannot continue."""


def row_bytes(cfg, dtype: torch.dtype) -> dict[str, int]:
    """Bytes per token row of every activation a forward pass names: Llama-family layers, gated
    attention's `gate`, Gated DeltaNet's `qkv` / `z` / `ba` (Qwen3-Next) and Lightning attention,
    whose k and v have all the query heads (MiniMax)."""
    e = torch.tensor([], dtype=dtype).element_size()
    hf = cfg.hf_config or {}
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    if cfg.architecture.startswith("MiniMax"):
        kv = max(kv, q)
    hk, hv = int(hf.get("linear_num_key_heads") or 0), int(hf.get("linear_num_value_heads") or 0)
    dk, dv = int(hf.get("linear_key_head_dim") or 0), int(hf.get("linear_value_head_dim") or 0)
    return {"residual": cfg.hidden_size * e, "hidden": cfg.hidden_size * e, "q": q * e, "k": kv * e, "v": kv * e,
            "gate": q * e, "attn_out": max(q, hv * dv) * e, "qkv": (2 * hk * dk + hv * dv) * e,
            "z": hv * dv * e, "ba": 2 * hv * e, "logits": cfg.vocab_size * 4}


class DisaggRunner(ModelRunner):
    def __init__(self, loaded: LoadedModel, stage_spec: str | Path | dict, block_size: int, dtype: torch.dtype,
                 max_positions: int, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64):
        super().__init__([], block_size, dtype, max_num_seqs=max_num_seqs)
        self.loaded, self.max_positions = loaded, max_positions
        self.max_tokens = max_num_batched_tokens
        mops = meta_ops(loaded, dtype, max_positions)  # names, declared tensors, attention shapes
        self.sigs = [OpSig(op.name, tuple(op.reads), tuple(op.writes)) for op in mops]
        self.attn_ops = [op for op in mops if isinstance(op, AttentionOp)]
        # linear-attention layers: per-sequence states live where their `attn` operations run
        self.state_specs = state_specs(mops)
        self.spec: StageSpec = parse_stage_spec(stage_spec, [s.name for s in self.sigs])
        self.graph = build_graph(self.sigs, self.spec.owner)
        # `streams: true`: the micro-batches are independent request streams, each with its own
        # scheduler and channels, so one stream samples while the other is on the stages.
        self.num_streams = self.spec.micro_batches if self.spec.raw.get("streams") else 1
        self.micro_batches = 1 if self.num_streams > 1 else self.spec.micro_batches
        st = self.spec.stages
        self.inline = len(st) == 1 and st[0].host is None and st[0].device == "cpu" and not self.spec.raw.get("processes")
        if self.inline:
            self.num_streams, self.micro_batches = 1, self.spec.micro_batches
        self.procs: list = []
        self.rings: list[ShmRing] = []
        self.segments: list[ShmSegment] = []
        self.failed: str | None = None
        self.step_id = 0
        self.collect_next: int | None = None  # streams: the stream whose logits execute() returns
        self.sample_on_stage = not self.inline and bool(self.spec.raw.get("sample_on_stage", True))
        self.sample_seed = int(self.spec.raw.get("sample_seed", 0))
        tok = getattr(loaded, "tokenizer", None)
        self.eos_token_ids = list((tok.eos_token_ids if tok is not None else None) or loaded.config.eos_token_ids or [])
        self.encoder = None
        if self.sample_on_stage:
            from opdisagg_rt.disagg.sampling import SampleEncoder
            self.encoder = SampleEncoder()
        self.out_stage = next(msg.src for msg in self.graph.messages() if msg.dst == DRIVER)
        self.memory: dict[str, dict] = {}
        self.counters = {"steps": 0, "meta_bytes": 0, "meta_bytes_uncached": 0, "logits_bytes": 0,
                         "sample_bytes": 0, "token_bytes": 0, "turnaround_s": 0.0, "turnarounds": 0}
        self.collected_at: dict[int, float] = {}
        self._finalizer = weakref.finalize(self, DisaggRunner._cleanup, self.procs, self.rings, self.segments)
        atexit.register(self._finalizer)

    # -- set-up -------------------------------------------------------------------------------

    def allocate_kv_cache(self, budget_bytes: int) -> int:
        """Same block count as the colocated engine; each stage allocates its own layers' blocks
        (and its linear-attention layers' state slots, as many as max_num_seqs)."""
        if self.inline:
            return self._allocate_inline(budget_bytes)
        self.num_blocks = num_blocks = self.num_kv_blocks(budget_bytes, self.state_specs)
        # the engine's block manager sees every KV cache group (sliding-window blocks are freed as
        # in the colocated engine); each stage binds its own layers' caches by the same layout.
        # State slots are handed out here (a pool without tensors); the stages hold the states.
        self.state_pool = StatePool({}, self.max_num_seqs) if self.state_specs else None
        self.kv_spec = KVCacheSpec(self.kv_layout()[0], self.state_pool)
        self._start_workers()
        # The stages are the compute; the engine process only schedules, prepares metadata and
        # detokenizes. Its idle OpenMP threads would spin on the cores the stages run on.
        local = sum(s.threads for s in self.spec.stages if s.host is None and s.device == "cpu")
        if local >= (os.cpu_count() or 1) and torch.get_num_threads() > 1:
            logger.info("stages use all %d cores: the engine process runs torch with 1 thread", os.cpu_count())
            torch.set_num_threads(1)
        self.loaded = None  # the workers hold the weights now
        return num_blocks

    def _allocate_inline(self, budget_bytes: int) -> int:
        """One stage in the engine process: the colocated runner's allocation, as is."""
        self.ops = build_model_ops(self.loaded, self.dtype, self.max_positions)
        self.attn_ops = [op for op in self.ops if isinstance(op, AttentionOp)]
        num_blocks = ModelRunner.allocate_kv_cache(self, budget_bytes)
        st = self.spec.stages[0]
        self.memory = {st.name: {"weights_bytes": sum(op.nbytes() for op in self.ops),
                                 "kv_cache_bytes": num_blocks * self.block_bytes(), "num_ops": len(self.ops),
                                 "attn_layers": len(self.attn_ops), "pid": os.getpid()}}
        self.loaded = None
        return num_blocks

    def _start_workers(self) -> None:
        ctx = tmp.get_context("spawn")
        spec, graph, m = self.spec, self.graph, self.micro_batches
        rows = row_bytes(self.loaded.config, self.dtype)
        slots = graph.slots_needed(m)  # per stream
        stale = sweep_stale()
        if stale:
            logger.warning("removed %d shared-memory segments of dead engines: %s", len(stale), stale)
        # GGUF block forms ride along as `name.kind` entries (as registry.build_model_ops merges them):
        # a stage streams its Q4_1/Q8_0 projections exactly as the colocated engine does
        blocks = {f"{n}.{kind}": b for n, (kind, b) in self.loaded.gguf_blocks.items()}
        wseg, wdesc = export_weights(self.loaded.weights | blocks)
        self.segments.append(wseg)
        status = ShmSegment(new_name("status"), STATUS_BYTES * len(spec.stages), create=True)
        self.segments.append(status)
        self.status = status
        groups, where, _ = self.kv_layout()
        per_group = 8 * (self.max_tokens + self.max_num_seqs * (self.max_positions // self.block_size + 2))
        meta_slot = 8 * (4 * self.max_tokens + 4 * self.max_num_seqs + 8) + per_group + 64 * self.max_num_seqs + 65536
        if len(groups) > 1:  # every group's slot mapping and block tables travel too
            meta_slot += len(groups) * per_group
        S = self.num_streams
        # sampling on the stage: rows with penalties / min_tokens carry their token ids
        hist_bytes = 8 * self.max_num_seqs * self.max_positions if self.sample_on_stage else 0
        if spec.transport == "dist":
            world = len(spec.stages) + 1
            ranks = {DRIVER: 0, **{s.name: s.index + 1 for s in spec.stages}}
            # env:// rendezvous: a launcher's MASTER_ADDR/PORT win; otherwise this host, a fresh port
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ or os.environ.get("_OPDISAGG_OWN_PORT"):
                os.environ["MASTER_PORT"] = os.environ["_OPDISAGG_OWN_PORT"] = str(_free_port())
            eps = {s.name: {"kind": "dist", "rank": s.index + 1, "world": world, "ranks": ranks, "streams": S}
                   for s in spec.stages}
        else:
            # one independent set of channels per stream, so streams never wait on each other's FIFO
            eps = {s.name: {"kind": "shm", "streams": [{"inputs": {}, "outputs": {}} for _ in range(S)]}
                   for s in spec.stages}
            for k in range(S):
                for (src, dst), n in slots.items():
                    if dst == DRIVER:
                        continue
                    width = max(sum(rows[x] for x in msg.names) for msg in graph.messages()
                                if (msg.src, msg.dst) == (src, dst))
                    r = ShmRing.spec(n, self.max_tokens * width + 4096, ctx)
                    eps[src]["streams"][k]["outputs"][dst] = eps[dst]["streams"][k]["inputs"][src] = r
                for s in spec.stages:
                    out = rows["logits"] * self.max_num_seqs if any(msg.src == s.name for msg in graph.messages()
                                                                   if msg.dst == DRIVER) else 0
                    extra = hist_bytes if s.name == self.out_stage else 0
                    eps[s.name]["streams"][k]["ctrl"] = ShmRing.spec(m + 1, meta_slot + extra, ctx)
                    eps[s.name]["streams"][k]["to_driver"] = ShmRing.spec(m + 1, out + 65536, ctx)
            for e in eps.values():  # the engine creates (and later unlinks) every segment
                for st in e["streams"]:
                    for r in [st["ctrl"], st["to_driver"], *st["outputs"].values()]:
                        self.rings.append(ShmRing.open(r, create=True))
        base = {"model_config": dataclasses.asdict(self.loaded.config), "source": self.loaded.source,
                "dtype": str(self.dtype).removeprefix("torch."), "max_positions": self.max_positions,
                "weights": wdesc, "num_blocks": self.num_blocks, "block_size": self.block_size,
                "sigs": [[s.name, list(s.reads), list(s.writes)] for s in self.sigs], "owner": spec.owner,
                "status": status.name, "status_size": status.size,
                "kv_layout": {name: list(gj) for name, gj in where.items()}, "state_slots": self.max_num_seqs}
        for s in spec.stages:
            cfg = {**base, "stage": s.name, "index": s.index, "threads": s.threads, "device": s.device, "ops": s.ops}
            if self.sample_on_stage and s.name == self.out_stage:
                cfg["sample"] = {"seed": self.sample_seed, "eos": self.eos_token_ids}
            p = ctx.Process(target=worker_main, args=(dumps(cfg), eps[s.name]), name=f"opdisagg-stage-{s.name}",
                            daemon=True)
            p.start()
            p._args = ()  # already pickled into the child; drop our semaphore references with it
            self.procs.append(p)
        if spec.transport == "dist":
            from opdisagg_rt.disagg.transport.dist import DistEndpoint, init_dist
            init_dist(0, len(spec.stages) + 1, "cpu")
            self.ctrls = [{s.name: DistEndpoint(s.index + 1, "cpu", tag=k) for s in spec.stages} for k in range(S)]
            self.to_drivers = self.ctrls
        else:
            by_name = {r.name: r for r in self.rings}
            self.ctrls = [{s.name: by_name[eps[s.name]["streams"][k]["ctrl"]["name"]] for s in spec.stages}
                          for k in range(S)]
            self.to_drivers = [{s.name: by_name[eps[s.name]["streams"][k]["to_driver"]["name"]] for s in spec.stages}
                               for k in range(S)]
        self.ctrl, self.to_driver = self.ctrls[0], self.to_drivers[0]  # stream 0 also carries commands
        deadline = time.monotonic() + max(self.spec.timeout_s, 300)
        for s in spec.stages:
            h, _ = self._recv(s.name, deadline, "start-up")
            self.to_driver[s.name].release()
            self.memory[s.name] = {**h["memory"], "pid": h["pid"]}
        wseg.unlink()  # every stage has copied its weights out
        wseg.close()
        self.segments.remove(wseg)
        logger.info("stages ready: %s", self.memory)

    # -- the step -----------------------------------------------------------------------------

    def prepare(self, scheduled) -> DisaggBatch:
        if self.collect_next is not None:  # streams: this step was prepared and sent already
            return DisaggBatch([])
        groups = split_micro_batches(scheduled, self.micro_batches)
        batch = DisaggBatch([ModelRunner.prepare(self, g) for g in groups])
        if self.encoder is not None:
            batch.samples = [self.encoder.encode(g) for g in groups]
        return batch

    @torch.inference_mode()
    def execute(self, batch) -> torch.Tensor:
        parts = batch.parts if isinstance(batch, DisaggBatch) else [batch]
        if self.inline:
            return torch.cat([run_ops(self.ops, p)["logits"] for p in parts]) if len(parts) > 1 \
                else run_ops(self.ops, parts[0])["logits"]
        if self.collect_next is not None:
            k, self.collect_next = self.collect_next, None
            return self.collect(k)
        return self._guard(lambda: self._step(parts, 0, getattr(batch, "samples", None)))

    def submit(self, stream: int, batch: DisaggBatch) -> None:
        """Streams: start a step of `stream` and return at once (collect() gets its logits)."""
        done = self.collected_at.pop(stream, None)
        if done is not None:  # the engine's turnaround: this stream's tokens in -> its next step out
            self.counters["turnaround_s"] += time.perf_counter() - done
            self.counters["turnarounds"] += 1
        self._guard(lambda: self._send_step(batch.parts, stream, batch.samples))

    def collect(self, stream: int) -> torch.Tensor:
        return self._guard(lambda: self._collect(1, stream))

    def _guard(self, fn):
        if self.failed:
            raise StageFailure(self.failed)
        try:
            return fn()
        except (StageFailure, PeerGone) as e:
            failure = str(e)
        # Raised outside the except block: the original traceback (whose frames hold transport
        # objects and semaphores) is dropped, so shutdown can really free every segment.
        self.failed = failure
        self._kill()
        raise StageFailure(failure)

    def _step(self, parts, stream: int, samples=None):
        self._send_step(parts, stream, samples)
        return self._collect(len(parts), stream)

    def _send_step(self, parts, stream: int, samples=None) -> None:
        self.step_id += 1
        deadline = time.monotonic() + self.spec.timeout_s
        visits = len(self.graph.visits)
        for i, p in enumerate(parts):
            header, tensors = encode_batch(p)
            nb = metadata_bytes(header, tensors)
            header.update(kind="step", step=self.step_id, mb=i, n=len(parts))
            self.counters["meta_bytes"] += nb * len(self.spec.stages)
            self.counters["meta_bytes_uncached"] += nb * visits  # what every visit would carry
            for s in self.spec.stages:
                h, ts = header, tensors
                if samples is not None and s.name == self.out_stage:  # sampling parameters: that stage only
                    info, extra = samples[i]
                    h, ts = {**header, "sample": info}, tensors + extra
                    self.counters["sample_bytes"] += len(json.dumps(info)) + sum(x.numel() * 8 for x in extra)
                self.ctrls[stream][s.name].send(h, ts, lambda: self._poll(deadline, "step"))

    def _collect(self, n: int, stream: int):
        deadline = time.monotonic() + self.spec.timeout_s
        logits = []
        ep = self.to_drivers[stream][self.out_stage]
        if self.sample_on_stage:  # token ids (and logprobs) sampled on the stage
            heads = []
            for _ in range(n):
                h, _ = ep.recv(lambda: self._poll(deadline, f"step {self.step_id}"))
                heads.append(h)
                ep.release()
            self.counters["steps"] += 1
            self.collected_at[stream] = time.perf_counter()
            out = merge_outputs(heads)
            self.counters["token_bytes"] += 8 * len(out.token_ids)
            return Presampled(out)
        for _ in range(n):
            _, ts = ep.recv(lambda: self._poll(deadline, f"step {self.step_id}"))
            logits.append(ts[0].clone())  # leave the slot to the next step
            ep.release()
        self.counters["steps"] += 1
        self.collected_at[stream] = time.perf_counter()
        self.counters["logits_bytes"] += sum(x.numel() * 4 for x in logits)
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def wrap_scheduler(self, scheduler):
        """The engine's scheduler, or (streams) one scheduler per stream behind the same interface."""
        if self.num_streams == 1:
            return scheduler
        from opdisagg_rt.disagg.streams import StreamScheduler
        return StreamScheduler(scheduler, self)

    def _recv(self, stage: str, deadline: float, what: str):
        return self.to_driver[stage].recv(lambda: self._poll(deadline, what))

    def _poll(self, deadline: float, what: str) -> None:
        """Called while waiting: a dead, failed or silent stage ends the wait with a clear error."""
        for s, p in zip(self.spec.stages, self.procs):
            st = Status(self.status, s.index)
            if int(st.words[S_STATE]) == FAILED:
                raise StageFailure(f"{what}: {Status.error(self.status, s.index)}")
            if p.exitcode is not None:
                raise StageFailure(f"{what}: stage {s.name!r} (pid {p.pid}) died with exit code {p.exitcode}")
        if time.monotonic() > deadline:
            late = []
            for s in self.spec.stages:
                w = Status(self.status, s.index).words
                late.append(f"{s.name!r} (pid {int(w[S_PID])}, step {int(w[S_STEP])}, unit {int(w[S_UNIT])}, "
                            f"{'ready' if int(w[S_STATE]) == READY else 'state ' + str(int(w[S_STATE]))})")
            raise StageFailure(f"{what}: no answer within timeout_s={self.spec.timeout_s:g} s; "
                               f"stage {late[0] if len(late) == 1 else 'progress: ' + ', '.join(late)} "
                               f"- a stage is hung")

    # -- reports and shutdown -----------------------------------------------------------------

    def stats(self, trace: bool = False) -> dict:
        """Bytes per step with and without metadata caching, per-stage traffic and memory;
        trace: each stage's last units as [start, end, micro-batch, visit] (perf_counter s)."""
        out = {"counters": dict(self.counters), "memory": self.memory, "stages": {}}
        if not self.inline and not self.failed:
            deadline = time.monotonic() + self.spec.timeout_s
            for s in self.spec.stages:
                self.ctrl[s.name].send({"kind": "stats", "trace": trace}, [], lambda: self._poll(deadline, "stats"))
                h, ts = self._recv(s.name, deadline, "stats")
                if trace:
                    h["trace"] = ts[0].tolist()
                self.to_driver[s.name].release()
                out["stages"][s.name] = h
        steps = max(self.counters["steps"], 1)
        act = sum(sum(v for k, v in h["bytes_sent"].items() if k != DRIVER) for h in out["stages"].values())
        logits = self.counters["logits_bytes"]
        logits += self.counters["sample_bytes"] + self.counters["token_bytes"]  # sampling on the stage: replaces the logits
        if self.counters["turnarounds"]:  # streams: engine time between a stream's results and its next step
            out["engine_turnaround_ms"] = 1e3 * self.counters["turnaround_s"] / self.counters["turnarounds"]
        out["per_step"] = {
            "activation_bytes": act / steps, "logits_bytes": self.counters["logits_bytes"] / steps,
            "metadata_bytes_cached": self.counters["meta_bytes"] / steps,
            "metadata_bytes_uncached": self.counters["meta_bytes_uncached"] / steps,
            "sampling_params_bytes": self.counters["sample_bytes"] / steps,
            "token_bytes": self.counters["token_bytes"] / steps,
            "total_bytes_cached": (act + logits + self.counters["meta_bytes"]) / steps,
            "total_bytes_uncached": (act + logits + self.counters["meta_bytes_uncached"]) / steps}
        return out

    def worker_pids(self) -> dict[str, int]:
        return {s.name: p.pid for s, p in zip(self.spec.stages, self.procs)}

    def shm_names(self) -> list[str]:
        return [r.name for r in self.rings] + [s.name for s in self.segments]

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)

    def shutdown(self) -> None:
        """Stop every worker (politely, then by force) and remove every shared-memory segment."""
        if self.procs and not self.failed and not self.inline:
            try:
                deadline = time.monotonic() + 2
                for s in self.spec.stages:
                    self.ctrl[s.name].send({"kind": "stop"}, [], lambda: self._poll(deadline, "shutdown"))
            except Exception:  # noqa: BLE001 - a broken stage is killed below anyway
                pass
            for p in self.procs:
                p.join(2)
        self._finalizer()
        if self.spec.transport == "dist" and not self.inline:
            from opdisagg_rt.disagg.transport.dist import destroy_dist
            destroy_dist()

    @staticmethod
    def _cleanup(procs: list, rings: list, segments: list) -> None:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
        procs.clear()
        for r in rings:
            r.unlink()
            r.close()
            r.full = r.free = None  # the last reference to a semaphore unlinks its /dev/shm/sem.* file
        rings.clear()
        for s in segments:
            s.unlink()
            s.close()
        segments.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
