"""A stage worker: a spawned process that builds only its own operations (weights and KV caches)
and runs a persistent loop: wait for a step's metadata, then run its visits for every
micro-batch, receiving activations from and sending them to the other stages.

Units run visit-major (visit v of micro-batch 0, then of micro-batch 1, ...), so while this
stage works on one micro-batch the next stage works on the other: the ping-pong of
disaggregated pipelines, within a step, falls out of the order alone.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import traceback
from collections import deque

import torch

from opdisagg_rt.cache.state_pool import StatePool, state_specs
from opdisagg_rt.config import ModelConfig
from opdisagg_rt.disagg.graph import DRIVER, OpSig, StageGraph, build_graph
from opdisagg_rt.disagg.meta import decode_batch, num_meta_tensors
from opdisagg_rt.disagg.transport.shm import ShmSegment
from opdisagg_rt.disagg.weights import build_ops_partial, import_weights, index_shapes, op_weight_names
from opdisagg_rt.layers.attention import AttentionOp
from opdisagg_rt.layers.base import Op
from opdisagg_rt.models.executor import run_op
from opdisagg_rt.models.loader import LoadedModel

# Status block per stage in the engine's status segment (int64 words, then an error text).
STATUS_BYTES = 4096
S_STATE, S_PID, S_STEP, S_UNIT, S_BEAT = range(5)
STARTING, READY, FAILED, STOPPED = 0, 1, 2, 3
ERR_OFF = 64


class Status:
    """This stage's progress words, readable by the engine to tell a hung stage from a slow one."""

    def __init__(self, seg: ShmSegment, index: int):
        self.base = index * STATUS_BYTES
        # a memoryview, not a tensor: the worker sets a word per visit (a tensor item store costs us)
        self.words = memoryview(seg.mm)[self.base:self.base + ERR_OFF].cast("q")
        self.seg = seg

    def set(self, slot: int, value: int) -> None:
        self.words[slot] = value

    def fail(self, message: str) -> None:
        raw = message.encode()[:STATUS_BYTES - ERR_OFF - 1]
        self.seg.mm[self.base + ERR_OFF:self.base + ERR_OFF + len(raw) + 1] = raw + b"\0"
        self.words[S_STATE] = FAILED

    @staticmethod
    def error(seg: ShmSegment, index: int) -> str:
        base = index * STATUS_BYTES + ERR_OFF
        return bytes(seg.mm[base:base + STATUS_BYTES - ERR_OFF]).split(b"\0", 1)[0].decode(errors="replace")


class StageProgram:
    """The visits of one stage and how to run them for one step."""

    def __init__(self, name: str, ops: list[Op], graph: StageGraph, state_pool: StatePool | None = None):
        self.name = name
        self.state_pool = state_pool  # this stage's linear-attention states, if it runs such layers
        # Streams run one thread each; the stage computes one unit at a time (as many cores as its
        # `threads`, like a device), so a unit waits while another stream's unit computes.
        self.compute = threading.Lock()
        by_name = {op.name: op for op in ops}
        self.visits = [(v, [by_name[n] for n in v.ops]) for v in graph.visits_of(name)]
        # per visit: (index, ops, [(src, names)], [(dst, names)], kept names, sends to the driver)
        self.plan = [(v.index, ops, [(m.src, m.names) for m in v.recv], [(m.dst, m.names) for m in v.send],
                      tuple(v.keep), any(m.dst == DRIVER for m in v.send)) for v, ops in self.visits]
        self.bytes_sent: dict[str, int] = {}
        self.recv_total = self.recv_inplace = 0
        self.busy_s = 0.0
        self.trace: deque[tuple[float, float, int, int]] = deque(maxlen=1500)  # (start, end, mb, visit)

    def reset_fresh_states(self, batch) -> None:
        """Zero the state slot of every request whose chunk starts at token 0: a slot the engine
        has just handed out (a new request, or one preempted and recomputed from the start), as the
        colocated engine zeroes a slot when it hands it out."""
        if batch.state_indices is None:
            return
        starts = batch.query_start_loc[:-1]
        has_rows = torch.tensor(batch.query_lens_list) > 0
        first = torch.zeros_like(starts)
        first[has_rows] = batch.positions[starts[has_rows]]
        for idx in batch.state_indices[has_rows & (first == 0) & (batch.state_indices >= 0)].tolist():
            self.state_pool.reset(idx)

    def run(self, batches, inputs, outputs, poll, status: Status | None = None, contains=None,
            stream: int = 0, sampler=None, samples=None) -> None:
        """inputs/outputs: endpoints by peer stage name (DRIVER for the logits). sampler (the
        stage that owns lm_head, sampling on the stage): samples[mb] = (info, history tensor);
        the engine then gets token ids instead of logits."""
        # A multi-visit spec runs tens of visits per micro-batch step, each a hand-off to another
        # process: keep the Python between two visits' compute to lookups (no headers, no dicts).
        tensors = [dict() for _ in batches]
        unit = 0
        lock, trace, bytes_sent = self.compute, self.trace, self.bytes_sent
        if self.state_pool is not None:
            with lock:
                for batch in batches:
                    self.reset_fresh_states(batch)
        for index, ops, recv, send, keep, to_driver in self.plan:
            if to_driver and sampler is None:
                to_driver = False
            for mb, batch in enumerate(batches):
                t = tensors[mb]
                got = []
                for src, names in recv:
                    ep = inputs[src]
                    _, ts = ep.recv(poll)
                    got.append(ep)
                    for n, x in zip(names, ts):
                        t[n] = x
                    self.recv_total += len(ts)
                    if contains is not None:
                        self.recv_inplace += sum(contains(ep, x) for x in ts)
                with lock:
                    start = time.perf_counter()
                    for op in ops:
                        run_op(op, t, batch)
                    for n in keep:  # needed by a later visit here: the slot is about to be reused
                        t[n] = t[n].clone()
                    sampled = sampler.sample(t["logits"], *samples[mb]) if to_driver else None
                    end = time.perf_counter()
                self.busy_s += end - start
                trace.append((start, end, mb + stream, index))  # perf_counter is CLOCK_MONOTONIC: one clock for all
                for dst, names in send:
                    if sampled is not None and dst == DRIVER:  # token ids, not logits
                        outputs[DRIVER].send({"mb": mb, **sampled}, (), poll)
                        continue
                    n = outputs[dst].send({}, [t[x] for x in names], poll)
                    bytes_sent[dst] = bytes_sent.get(dst, 0) + n
                for ep in got:
                    ep.release()
                unit += 1
                if status is not None:
                    status.set(S_UNIT, unit)


def _sample_info(header: dict, tensors) -> tuple[dict, torch.Tensor | None] | None:
    """The engine's sampling entry of one micro-batch (after the metadata tensors), if any."""
    info = header.get("sample")
    if info is None:
        return None
    extra = tensors[num_meta_tensors(header):]
    return info, (extra[0] if extra else None)


def build_stage(cfg: dict) -> tuple[list[Op], StageProgram, dict]:
    mc = ModelConfig(**cfg["model_config"])
    meta = LoadedModel(mc, index_shapes(cfg["weights"]), None, "", cfg["source"])  # type: ignore[arg-type]
    names = list(cfg["weights"]["index"])
    mine = cfg["ops"]
    wanted = sorted({w for op in mine for w in op_weight_names(op, names)})
    dtype = getattr(torch, cfg["dtype"])
    if os.path.exists(f"/dev/shm/{cfg['weights']['segment']}"):
        weights = import_weights(cfg["weights"], wanted)
    else:  # another host: read the checkpoint here, keep only this stage's tensors
        from opdisagg_rt.models.loader import load_model
        lm = load_model(cfg["source"])
        full = lm.weights | {f"{n}.{kind}": b for n, (kind, b) in lm.gguf_blocks.items()}
        weights = {k: full[k] for k in wanted}
        del full
    ops = build_ops_partial(meta, dtype, cfg["max_positions"], weights, set(mine))
    kv_bytes = 0
    caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for op in ops:
        if isinstance(op, AttentionOp):
            # the engine's KV layout: (group, tensor pair) per layer; layers of different groups
            # share a pair (their block ids never collide), as in the colocated engine
            g, j = cfg["kv_layout"].get(op.name, (0, op.name))
            if j not in caches:
                shape = (cfg["num_blocks"], cfg["block_size"], op.num_kv_heads, op.head_dim)
                caches[j] = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                kv_bytes += 2 * caches[j][0].numel() * caches[j][0].element_size()
            op.bind_cache(*caches[j])
            op.kv_group = g
    states = state_specs(ops)
    pool = StatePool(states, cfg["state_slots"]) if states else None
    if pool is not None:
        pool.bind(ops)
    sigs = [OpSig(n, tuple(r), tuple(w)) for n, r, w in cfg["sigs"]]
    graph = build_graph(sigs, cfg["owner"])
    memory = {"weights_bytes": sum(op.nbytes() for op in ops), "kv_cache_bytes": kv_bytes,
              "state_bytes": StatePool.slot_bytes(states) * cfg["state_slots"] if states else 0,
              "num_ops": len(ops), "attn_layers": sum(isinstance(op, AttentionOp) for op in ops)}
    return ops, StageProgram(cfg["stage"], ops, graph, pool), memory


def worker_main(cfg_json: str, endpoints: dict) -> None:
    """Process entry point. cfg_json: everything JSON-able; endpoints: transport handles
    (ring names + semaphores, or torch.distributed ranks) created by the engine."""
    cfg = json.loads(cfg_json)
    torch.set_num_threads(cfg["threads"])
    ppid = os.getppid()
    try:
        status_seg = ShmSegment(cfg["status"], cfg["status_size"], create=False)
    except FileNotFoundError:  # another host: progress words stay private (the engine sees only gloo)
        status_seg = ShmSegment.anonymous(cfg["status_size"])
    status = Status(status_seg, cfg["index"])
    status.set(S_PID, os.getpid())

    def poll() -> None:  # runs while a wait times out: leave when the engine is gone
        if os.getppid() != ppid:
            os._exit(0)
        status.set(S_BEAT, status.words[S_BEAT] + 1)

    def fail(e: BaseException) -> None:  # tell the engine why, then die: the step cannot complete anyway
        status.fail(f"stage {cfg['stage']!r} (pid {os.getpid()}): {type(e).__name__}: {e}\n"
                    + "".join(traceback.format_exc(limit=6)))
        sys.stderr.flush()
        os._exit(1)

    def serve(stream, ctrl, to_driver, inputs, outputs) -> None:
        """One stream's loop. Stream 0 also answers commands; the others only run steps."""
        # Intra-op threads are per OS thread for OpenMP (oneDNN, at::parallel_for): a new thread
        # would run with one per core, not the stage's `threads`.
        torch.set_num_threads(cfg["threads"])
        try:
            with torch.inference_mode():  # thread-local: entered by every stream's thread
                while True:
                    header, ts = ctrl.recv(poll)
                    kind = header["kind"]
                    if kind == "stop":
                        ctrl.release()
                        return
                    if kind == "stats":
                        ctrl.release()
                        trace = torch.tensor(list(program.trace) if header.get("trace") else [], dtype=torch.float64)
                        to_driver.send({"kind": "stats", "bytes_sent": program.bytes_sent, "busy_s": program.busy_s,
                                        "recv_total": program.recv_total, "recv_inplace": program.recv_inplace,
                                        "memory": memory}, [trace], poll)
                        continue
                    # a step: header + tensors of micro-batch 0, then the other micro-batches' metadata
                    n = header["n"]
                    batches = [decode_batch(header, ts)]
                    samples = [_sample_info(header, ts)]
                    for _ in range(n - 1):
                        h, t2 = ctrl.recv(poll)
                        batches.append(decode_batch(h, t2))
                        samples.append(_sample_info(h, t2))
                    status.set(S_STEP, header["step"])
                    status.set(S_UNIT, 0)
                    program.run(batches, inputs, outputs, poll, status, contains, stream,
                                samplers[stream] if samples[0] is not None else None, samples)
                    for _ in range(n):
                        ctrl.release()
        except BaseException as e:  # noqa: BLE001
            fail(e)

    try:
        from opdisagg_rt.disagg.transport.endpoints import open_worker_endpoints
        streams, contains = open_worker_endpoints(cfg, endpoints)
        for ctrl, to_driver, inputs, outputs in streams:
            outputs[DRIVER] = to_driver
        ops, program, memory = build_stage(cfg)
        # As the engine: the stage's long-lived objects (ops, weights' wrappers) leave the cyclic
        # GC's generations, so the collections each step triggers do not rescan them.
        gc.collect()
        gc.freeze()
        memory["gc_frozen_objects"] = gc.get_freeze_count()
        samplers: list = [None] * len(streams)
        if cfg.get("sample"):  # this stage owns lm_head and samples (opdisagg_rt.disagg.sampling)
            from opdisagg_rt.disagg.sampling import StageSampler
            gens: dict = {}
            samplers = [StageSampler(cfg["sample"]["seed"] + k, cfg["sample"]["eos"], gens) for k in range(len(streams))]
        streams[0][1].send({"kind": "ready", "memory": memory, "pid": os.getpid()}, [], poll)
        status.set(S_STATE, READY)
        # Independent streams: one thread each. Torch kernels release the GIL, so while one
        # stream waits for its activations the other computes on this stage's core.
        for k, st in enumerate(streams[1:], 1):
            threading.Thread(target=serve, args=(k, *st), daemon=True).start()
        serve(0, *streams[0])
        status.set(S_STATE, STOPPED)
    except BaseException as e:  # noqa: BLE001
        fail(e)
    os._exit(0)  # stream threads may still wait on their channels
