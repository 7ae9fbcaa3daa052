"""Predicted throughput of a stage spec run by the disaggregated runtime on this machine, against
the colocated engine (every operation in one process with all the cores' threads).

For one step of a workload the prediction builds, from the per-operation cost model (ops.py) and a
device profile (the calibrated CPU of hardware.py, or any Device), each stage's *units*: the
visits of the stage graph (maximal runs of consecutive operations on one stage) with

  busy time = sum of its operations' predicted times at the stage's thread count
              + copying what it sends into the transport (zero-copy receive)
              (+ sampling, on the stage that owns `lm_head` when the runtime samples there),

and, between consecutive visits, the transfer time of the tensors that cross (the stage graph's
rule: a tensor crosses only to a stage that reads it and does not hold its current version).
The engine process (scheduling, metadata, detokenizing; sampling when the logits come back to
it) is one more serial resource. Micro-batches run through the units as the runtime does:

- `streams: true` (independent request streams): each stream cycles host -> units -> host...;
  the period of a round (every stream makes one step) is found by simulating the streams on
  the resources (FIFO by ready time), bounded below by the CPU work over the cores;
- within-step micro-batches: every stage runs its units visit-major (visit v of every micro-batch,
  then visit v+1), so the step is the makespan of that schedule plus the engine's work.

Thread counts: the calibrated profile is for one thread; an operation's time with n threads is
its one-thread time divided by the measured speedup of its kind (`THREAD_SPEEDUP`, re-measure
with `measure_thread_scaling`). A machine with fewer cores than the busy processes shares them.
Nothing here imports the engine except the measuring helpers (`measure_host`).
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opdisagg_rt.analysis.hardware import CPU_PROFILE, Device, Link, cpu_device
from opdisagg_rt.analysis.models import ModelSpec, load_model
from opdisagg_rt.analysis.ops import _attn_out_dim, _qkv_out, model_ops
from opdisagg_rt.analysis.stagespec import check_stage_spec, load_stage_spec
from opdisagg_rt.analysis.workload import Workload

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}

# Speedup of an operation kind with n intra-op threads over one thread, measured on this machine
# (2-core Xeon with AMX, SmolLM2-135M decode shapes, reference ops; `measure_thread_scaling`,
# median of three quiet runs on 2026-11-22: gemm 1.68/1.77/1.89, attn 1.64/1.68/1.76).
# Kinds not listed use "other"; thread counts not listed scale the 2-thread gain linearly.
THREAD_SPEEDUP: dict[int, dict[str, float]] = {
    2: {"gemm": 1.77, "attn": 1.68, "norm": 1.0, "embed": 1.0, "other": 1.3},
}

# The engine process per step (measured on this machine: `measure_host`): scheduling, building
# the step metadata, output processing and detokenizing; sampling is separate (engine or stage).
HOST = {"step_us": 1130.0, "row_us": 38.5, "sample_row_us": 13.5, "sample_step_us": 31.0}  # medians of 3 runs
# CPU time of one transport message on each side (header encode/decode, semaphores), on top of the
# one copy of the activations (`measure_transport_cpu`)
MSG_CPU_US = 43.0  # median of 3 runs (32-46 us)
# Transport per message when the device has no scale_up link: shared-memory ring, one way
# (bench/disagg/transport_latency.json: 35-43 us for 123 KB).
SHM_LINK = Link("shm", 5.0, 30.0)


@dataclass(slots=True)
class BenchWorkload:
    """The bench's random workload: every request arrives at once."""
    num_requests: int = 32
    input_len: int = 128
    output_len: int = 128
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048


@dataclass(slots=True)
class StageInfo:
    name: str
    threads: int
    ops: list[str]
    device: str = "cpu"


@dataclass(slots=True)
class Unit:
    """One visit of one micro-batch: `stage` busy for `busy` s, then `xfer` s until the next visit."""
    stage: str
    visit: int
    busy: float
    xfer: float = 0.0


@dataclass(slots=True)
class StepPlan:
    units: list[Unit]          # one micro-batch's visits, in order
    host: float                # engine-process time of one step of this micro-batch / stream
    stage_busy: dict[str, float] = field(default_factory=dict)  # per micro-batch
    transfers: list[dict] = field(default_factory=list)


# -- what crosses between stages ----------------------------------------------------------------

def _role(op: str) -> str:
    return op.split(".", 2)[2] if op.startswith("layers.") else op


FLOW = {"embed": ((), ("residual",)), "attn_norm": (("residual",), ("hidden",)), "qkv_proj": (("hidden",), ("qkv",)),
        "attn": (("qkv",), ("attn_out",)), "o_proj": (("attn_out", "residual"), ("residual",)),
        "mlp_norm": (("residual",), ("hidden",)), "mlp": (("hidden", "residual"), ("residual",)),
        "moe": (("hidden", "residual"), ("residual",)), "final_norm": (("residual",), ("hidden_last",)),
        "lm_head": (("hidden_last",), ("logits",))}


def _row_bytes(m: ModelSpec, op: str, tensor: str, b: int) -> float:
    """Bytes per token row of a tensor (q, k, v travel as one `qkv`)."""
    if tensor in ("residual", "hidden", "hidden_last"):
        return m.hidden_size * b
    i = int(op.split(".")[1]) if op.startswith("layers.") else 0
    l = m.layers[i]
    if tensor == "qkv":
        return (_qkv_out(m, l)[1] if l.attn != "mla" else m.num_heads * (m.qk_nope_dim + m.qk_rope_dim)) * b
    if tensor == "attn_out":
        return _attn_out_dim(m, l) * b
    if tensor == "logits":
        return m.vocab_size * 4
    raise KeyError(tensor)


def visits(op_names: list[str], owner: dict[str, str]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for op in op_names:
        if not out or out[-1][0] != owner[op]:
            out.append((owner[op], []))
        out[-1][1].append(op)
    return out


def crossings(m: ModelSpec, vis: list[tuple[str, list[str]]], tokens: float, logit_rows: float, b: int,
              driver: bool) -> list[list[tuple[str, float]]]:
    """Per visit: (destination, bytes) of the tensors it sends (the runtime's rule: a tensor goes
    to a stage that reads it while not holding its current version; `driver`: logits to the engine)."""
    holders: dict[str, set[str]] = {}
    producer: dict[str, tuple[int, str]] = {}  # tensor -> (visit, writing op)
    sends: list[dict[str, float]] = [dict() for _ in vis]
    for vi, (st, ops) in enumerate(vis):
        written: set[str] = set()
        for op in ops:
            reads, writes = FLOW[_role(op)]
            for t in reads:
                if t in written or st in holders.get(t, ()):
                    continue
                pv, pop = producer[t]
                rows = logit_rows if t in ("hidden_last", "logits") else tokens
                sends[pv][st] = sends[pv].get(st, 0.0) + rows * _row_bytes(m, pop, t, b)
                holders[t].add(st)
            for t in writes:
                written.add(t)
                producer[t] = (vi, op)
        for t in written:
            holders[t] = {st}
    if driver:
        pv, pop = producer["logits"]
        sends[pv]["driver"] = sends[pv].get("driver", 0.0) + logit_rows * _row_bytes(m, pop, "logits", b)
    return [list(s.items()) for s in sends]


# -- per-op times at a thread count ---------------------------------------------------------------

def thread_speedup(kind: str, threads: int, table: dict[int, dict[str, float]] | None = None) -> float:
    if threads <= 1:
        return 1.0
    table = table or THREAD_SPEEDUP
    if threads in table:
        row = table[threads]
        return row.get(kind, row.get("other", 1.0))
    n0 = max(k for k in table if k <= threads) if any(k <= threads for k in table) else min(table)
    s0 = thread_speedup(kind, n0, table)
    return 1.0 + (s0 - 1.0) * (threads - 1) / (n0 - 1)


def op_times(m: ModelSpec, w: Workload, dev: Device, dtype: str, threads: int,
             speedup: dict[int, dict[str, float]] | None = None) -> dict[str, float]:
    out = {}
    for o in model_ops(m, w, DTYPE_BYTES[dtype]):
        t, _ = dev.op_time(o, dtype)
        out[o.op] = t / thread_speedup(o.kind, threads, speedup)
    return out


# -- one step as units ----------------------------------------------------------------------------

def step_plan(m: ModelSpec, stages: list[StageInfo], owner: dict[str, str], w: Workload, dev: Device, dtype: str,
              link: Link, host: dict[str, float], sample_on_stage: bool,
              speedup: dict[int, dict[str, float]] | None = None, msg_cpu_us: float = MSG_CPU_US) -> StepPlan:
    """Units of one micro-batch (workload `w` = that micro-batch's sequences)."""
    b = DTYPE_BYTES[dtype]
    names = m.op_names()
    vis = visits(names, owner)
    threads = {s.name: s.threads for s in stages}
    times = {s.name: op_times(m, w, dev, dtype, s.threads, speedup) for s in stages}
    rows = w.logit_rows
    sends = crossings(m, vis, w.tokens, rows, b, driver=not sample_on_stage and len(stages) > 1)
    hot = getattr(dev.profile, "hot_bw", None) or (lambda n: dev.mem_tbps * 1e12)
    units, busy, transfers = [], {s.name: 0.0 for s in stages}, []
    sample = (host["sample_step_us"] + host["sample_row_us"] * rows) * 1e-6
    recv_msgs = [0] * len(vis)
    for vi, (st, ops) in enumerate(vis):
        for dst, _ in sends[vi]:
            nxt = next((j for j in range(vi + 1, len(vis)) if vis[j][0] == dst), None)
            if nxt is not None:
                recv_msgs[nxt] += 1
    for vi, (st, ops) in enumerate(vis):
        t = sum(times[st][op] for op in ops) + recv_msgs[vi] * msg_cpu_us * 1e-6
        xfer = 0.0
        for dst, nbytes in sends[vi]:
            t += nbytes / hot(nbytes) + msg_cpu_us * 1e-6  # the sender's one copy into the ring
            x = link.time(nbytes)
            transfers.append({"visit": vi, "src": st, "dst": dst, "bytes": nbytes, "s": x})
            xfer = max(xfer, x)
        if "lm_head" in ops and sample_on_stage and len(stages) > 1:
            t += sample / thread_speedup("other", threads[st], speedup)
        units.append(Unit(st, vi, t, xfer))
        busy[st] += t
    h = _host(w, host)
    if not (sample_on_stage and len(stages) > 1):
        h += sample
    return StepPlan(units, h, busy, transfers)


def _host(w: Workload, host: dict[str, float]) -> float:
    return (host["step_us"] + host["row_us"] * sum(g.count for g in w.groups())) * 1e-6


# -- schedules ------------------------------------------------------------------------------------

def simulate_streams(plan: StepPlan, streams: int, rounds: int = 24, makespan: bool = False) -> float:
    """Steady-state period (s) for every stream to make one step: each stream cycles
    host -> units; resources (the engine, each stage) serve ready work FIFO. makespan: instead,
    the time until every stream has made `rounds` steps (a short phase such as the prefill)."""
    free: dict[str, float] = {}
    tasks = [("__host__", plan.host, 0.0)] + [(u.stage, u.busy, u.xfer) for u in plan.units]
    n = len(tasks)
    heap = [(0.0, k, k, 0) for k in range(streams)]  # (ready, tie, stream, task index)
    done: list[list[float]] = [[] for _ in range(streams)]
    tie = streams
    while heap:
        ready, _, k, i = heapq.heappop(heap)
        res, dur, xfer = tasks[i % n]
        start = max(ready, free.get(res, 0.0))
        end = free[res] = start + dur
        if i % n == n - 1:
            done[k].append(end)
        if i + 1 < rounds * n:
            tie += 1
            heapq.heappush(heap, (end + xfer, tie, k, i + 1))
    if makespan:
        return max(d[-1] for d in done)
    a, z = rounds // 3, rounds - 1
    return max((d[z] - d[a]) / (z - a) for d in done)


def simulate_step(plan: StepPlan, micro_batches: int) -> float:
    """One step with `micro_batches` parts, each stage running its units visit-major (the worker's
    order): the engine's work, then the makespan of the units."""
    free: dict[str, float] = {}
    ready = [0.0] * micro_batches
    for u in plan.units:
        for mb in range(micro_batches):
            start = max(ready[mb], free.get(u.stage, 0.0))
            end = free[u.stage] = start + u.busy
            ready[mb] = end + u.xfer
    return plan.host * micro_batches + max(ready)


# -- the prediction -------------------------------------------------------------------------------

def model_spec_from_config(cfg: Any, name: str | None = None) -> ModelSpec:
    """The cost model's ModelSpec of an engine ModelConfig (its raw HF config when it has one)."""
    from opdisagg_rt.analysis.models import parse_hf_config
    hf = dict(getattr(cfg, "hf_config", None) or {})
    if not hf.get("model_type"):
        hf = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
              "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
              "head_dim": cfg.head_dim, "tie_word_embeddings": cfg.tie_word_embeddings, **hf}
    return parse_hf_config(hf, name=name or hf.get("_name_or_path") or getattr(cfg, "architecture", "model"))


def _device(profile: str | Path | Device | None) -> Device:
    if isinstance(profile, Device):
        return profile
    path = Path(profile) if profile else CPU_PROFILE
    if not path.exists():
        raise FileNotFoundError(f"no CPU profile at {path}: run `python -m opdisagg_rt.analyze calibrate` first")
    return cpu_device(path)


def _stages(spec: dict, names: list[str]) -> tuple[list[StageInfo], dict[str, str]]:
    owner = check_stage_spec(spec, names)
    stages = []
    for name, st in spec["stages"].items():
        threads = int(st.get("threads") or st.get("count") or 1)
        stages.append(StageInfo(name, threads, [n for n in names if owner[n] == name], st.get("device", "cpu")))
    return stages, owner


def _phase_time(m, stages, owner, w_step: Workload, dev, dtype, link, host, sample_on_stage, speedup,
                streams: int, micro_batches: int, cores: int, msg_cpu_us: float,
                rounds: int | None = None) -> tuple[float, StepPlan]:
    """Seconds per step of `w_step` (the whole batch; streams: every stream makes a step of its
    share) in steady state, or (rounds) for `rounds` such steps from an idle pipeline."""
    parts = streams if streams > 1 else micro_batches
    w_part = w_step.scaled(1.0 / parts)
    plan = step_plan(m, stages, owner, w_part, dev, dtype, link, host, sample_on_stage, speedup, msg_cpu_us)
    if streams > 1:
        t = simulate_streams(plan, streams, rounds or 24, makespan=rounds is not None)
    else:
        t = simulate_step(plan, micro_batches) * (rounds or 1)
    # CPU bound: every stage's and the engine's work shares `cores` cores
    work = parts * (sum(plan.stage_busy[s.name] * s.threads for s in stages) + plan.host) * (rounds or 1)
    return max(t, work / cores), plan


def predict(spec: str | Path | dict, model: str | ModelSpec = "smollm2-135m",
            workload: BenchWorkload | None = None, profile: str | Path | Device | None = None,
            dtype: str = "bf16", cores: int | None = None, link: Link | None = None,
            host: dict[str, float] | None = None, speedup: dict[int, dict[str, float]] | None = None,
            colocated_threads: int | None = None, msg_cpu_us: float = MSG_CPU_US) -> dict[str, Any]:
    """Predicted throughput of `spec` and of the colocated engine on the same workload, and their ratio."""
    import os
    m = load_model(model) if isinstance(model, str) else model
    wl = workload or BenchWorkload()
    dev = _device(profile)
    spec_d = load_stage_spec(spec)
    cores = cores or os.cpu_count() or 1
    host = {**HOST, **(host or {})}
    link = link or dev.links.get("scale_up") or SHM_LINK
    names = m.op_names()
    stages, owner = _stages(spec_d, names)
    mb = int(spec_d.get("micro_batches", 1))
    streams = mb if spec_d.get("streams") else 1
    sample_on_stage = bool(spec_d.get("sample_on_stage", True))
    colo_threads = colocated_threads or cores

    N, I, O = wl.num_requests, wl.input_len, wl.output_len
    decode = Workload("decode", N, [(I + max(O // 2, 1), 1.0)])
    # prompts per step within the token budget (streams share it: each stream gets budget / streams)
    per_step_prompts = max(1, min(N, wl.max_num_batched_tokens // max(I, 1)))
    prefill_steps = math.ceil(N / per_step_prompts)
    prefill = Workload("prefill", per_step_prompts, [(I, 1.0)])

    def run(st, own, strm, mbs, on_stage):
        tp, _ = _phase_time(m, st, own, prefill, dev, dtype, link, host, on_stage, speedup, strm, mbs, cores,
                            msg_cpu_us, rounds=prefill_steps)
        td, plan = _phase_time(m, st, own, decode, dev, dtype, link, host, on_stage, speedup, strm, mbs, cores, msg_cpu_us)
        total = tp + max(O - 1, 0) * td
        return {"throughput_tok_s": N * O / total, "decode_step_ms": td * 1e3, "prefill_s": tp,
                "total_s": total}, plan

    dis, plan = run(stages, owner, streams, mb if streams == 1 else 1, sample_on_stage)
    colo_stage = [StageInfo("colocated", colo_threads, names)]
    colo, cplan = run(colo_stage, {n: "colocated" for n in names}, 1, 1, False)
    parts = streams if streams > 1 else mb
    stage_rows = {}
    for s in stages:
        units = [u for u in plan.units if u.stage == s.name]
        stage_rows[s.name] = {"threads": s.threads, "num_ops": len(s.ops), "visits": len(units),
                              "busy_ms_per_micro_batch": plan.stage_busy[s.name] * 1e3,
                              "busy_ms_per_step": plan.stage_busy[s.name] * parts * 1e3,
                              "utilization": plan.stage_busy[s.name] * parts / (dis["decode_step_ms"] * 1e-3)}
    xfers = [x for x in plan.transfers if x["dst"] != "driver"]
    return {
        "ratio_vs_colocated": dis["throughput_tok_s"] / colo["throughput_tok_s"],
        "disaggregated": dis, "colocated": {**colo, "threads": colo_threads,
                                             "busy_ms_per_step": cplan.stage_busy["colocated"] * 1e3},
        "stages": stage_rows,
        "engine_ms_per_step": plan.host * parts * 1e3,
        "transfers": {"per_micro_batch": len(xfers), "bytes_per_micro_batch": sum(x["bytes"] for x in xfers),
                      "s_per_visit_mean": (sum(x["s"] for x in xfers) / len(xfers)) if xfers else 0.0,
                      "logits_to_engine_bytes": sum(x["bytes"] for x in plan.transfers if x["dst"] == "driver")},
        "mode": "streams" if streams > 1 else "micro-batches", "micro_batches": mb, "sample_on_stage": sample_on_stage,
        "workload": {"num_requests": N, "input_len": I, "output_len": O, "decode_context": decode.context[0][0],
                     "prefill_steps": prefill_steps},
        "model": m.name, "dtype": dtype, "cores": cores,
        "profile": str(profile) if profile and not isinstance(profile, Device) else str(CPU_PROFILE),
        "assumptions": {"thread_speedup": (speedup or THREAD_SPEEDUP), "host_us": host, "msg_cpu_us": msg_cpu_us,
                        "link": {"gbps": link.gbps, "latency_us": link.latency_us}},
    }


def format_prediction(p: dict) -> str:
    lines = [f"predicted ({p['mode']}, micro_batches {p['micro_batches']}, sampling on "
             f"{'the lm_head stage' if p['sample_on_stage'] else 'the engine'}; {p['model']} {p['dtype']}, "
             f"{p['cores']} cores):"]
    for name, s in p["stages"].items():
        lines.append(f"  stage {name:<10s} {s['threads']} thr, {s['visits']:3d} visits/step: busy "
                     f"{s['busy_ms_per_step']:7.2f} ms per decode step ({100 * s['utilization']:.0f}% busy)")
    d, c = p["disaggregated"], p["colocated"]
    t = p["transfers"]
    lines.append(f"  transfers: {t['per_micro_batch']} per micro-batch step, {t['bytes_per_micro_batch'] / 1e3:.1f} KB, "
                 f"{t['s_per_visit_mean'] * 1e6:.0f} us each; engine {p['engine_ms_per_step']:.2f} ms/step")
    lines.append(f"  disaggregated: decode step {d['decode_step_ms']:.2f} ms -> {d['throughput_tok_s']:.1f} tok/s")
    lines.append(f"  colocated ({c['threads']} threads): decode step {c['decode_step_ms']:.2f} ms -> "
                 f"{c['throughput_tok_s']:.1f} tok/s")
    lines.append(f"  predicted ratio disaggregated / colocated: {p['ratio_vs_colocated']:.2f}x")
    return "\n".join(lines)


# -- measuring the assumptions on this machine ----------------------------------------------------

def _wall(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    fast = sorted(ts)[:max(1, (len(ts) + 1) // 2)]
    return fast[len(fast) // 2]  # low median: other processes only ever add time


def measure_thread_scaling(model: str | ModelSpec = "smollm2-135m", batch: int = 32, context: int = 192,
                           threads: int = 2, dtype: str = "bf16", reps: int = 15) -> dict[str, float]:
    """Speedup per op kind with `threads` intra-op threads over one (wall time, low median), on the
    reference ops of a decode step: GEMMs of the model's shapes, decode attention, RMSNorm."""
    import torch
    import torch.nn.functional as F

    from opdisagg_rt.analysis import reference as R
    m = load_model(model) if isinstance(model, str) else model
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    h, B = m.hidden_size, batch
    shapes = [(h, m.q_dim + 2 * m.kv_dim), (m.q_dim, h), (h, 2 * m.intermediate_size), (m.intermediate_size, h),
              (h, m.vocab_size)]
    x = {k: torch.randn(B, k, dtype=dt) for k, _ in shapes}
    ws = {(k, n): torch.randn(n, k, dtype=dt) * 0.02 for k, n in shapes}
    H, Hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    kc, vc = (torch.randn(B, Hkv, context + 1, d, dtype=dt) for _ in range(2))
    q, k1, v1 = torch.randn(B, H, d, dtype=dt), torch.randn(B, Hkv, d, dtype=dt), torch.randn(B, Hkv, d, dtype=dt)
    xn, wn = torch.randn(B, h, dtype=dt), torch.ones(h, dtype=dt)
    fns = {"gemm": lambda: [F.linear(x[k], ws[(k, n)]) for k, n in shapes],
           "attn": lambda: R.attn_decode(q, kc, vc, k1, v1, context, None),
           "norm": lambda: R.rms_norm(xn, wn)}
    prev = torch.get_num_threads()
    out = {}
    try:
        with torch.inference_mode():
            for kind, fn in fns.items():
                torch.set_num_threads(1)
                t1 = _wall(fn, reps)
                torch.set_num_threads(threads)
                tn = _wall(fn, reps)
                out[kind] = t1 / tn
    finally:
        torch.set_num_threads(prev)
    return out


def measure_transport_cpu(rows: int = 16, width: int = 960, n: int = 400) -> float:
    """CPU microseconds per shared-memory message on one side (send or receive), for a decode
    micro-batch's q, k, v (bf16 rows of `width`), minus the copy the cost model counts."""
    from opdisagg_rt.disagg.latency import measure
    r = measure("shm", rows, width // 2, n)  # float32 rows of width/2 = the bytes of bf16 rows
    copy = r["bytes"] / 20e9 * 1e6 / 2  # half the messages carry a copy (the receive side does not)
    return max(r["cpu_us_per_message"] - copy, 0.0)


def measure_host(batch: int = 32, steps: int = 24, dtype: str = "bfloat16") -> dict[str, float]:
    """The engine process's own time per decode step of the colocated engine (step minus forward,
    minus sampling), and the sampler's time; at two batch sizes for a per-row fit."""
    import torch

    from opdisagg_rt.engine import Engine
    from opdisagg_rt.sampling import Sampler, SamplingParams
    eng = Engine(None, dtype=dtype, num_threads=1)
    res = {}
    for n in (batch // 4, batch):
        fwd: list[float] = []
        orig = eng.runner.execute

        def timed(b, orig=orig):
            t = time.perf_counter()
            out = orig(b)
            fwd.append(time.perf_counter() - t)
            return out
        eng.runner.execute = timed
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
        prompts = [[1000 + i] * 16 for i in range(n)]
        eng.generate(prompts, params, use_tqdm=False)
        fwd.clear()
        t0 = time.perf_counter()
        eng.generate(prompts, params, use_tqdm=False)
        total = time.perf_counter() - t0
        eng.runner.execute = orig
        logits = torch.randn(n, eng.model_config.vocab_size)
        s = Sampler(0)
        ts = _wall(lambda: s.sample(logits, [params] * n), 9)
        res[n] = ((total - sum(fwd)) / steps - ts, ts)
    (n0, (h0, s0)), (n1, (h1, s1)) = sorted(res.items())
    row = max((h1 - h0) / (n1 - n0), 0.0)
    srow = max((s1 - s0) / (n1 - n0), 0.0)
    return {"step_us": max(h0 - row * n0, 0.0) * 1e6, "row_us": row * 1e6,
            "sample_step_us": max(s0 - srow * n0, 0.0) * 1e6, "sample_row_us": srow * 1e6}
