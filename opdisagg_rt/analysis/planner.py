"""Placement planner: assign operation groups to device groups, rank by throughput per dollar.

Groups are the units of placement: the attention core of each layer kind, the projections
(+ norms) of each layer kind, the dense MLPs, the MoE blocks, and embed/final_norm/lm_head.
Each device type used by a plan is one stage (tensor-parallel over `count` devices); plans with
one stage are the homogeneous baseline, plus a contiguous layer-pipeline baseline.

Step time with m micro-batches. Multi-visit plans ping-pong inside every layer, so per layer
  cycle = max(m * slowest stage's time for one micro-batch, one micro-batch's chain of ops + transfers)
(the second term is the dependency chain that more micro-batches cannot hide). The layer pipeline
uses the classic fill + steady state: sum_s t_s + (m - 1) * max_s t_s.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import yaml

from opdisagg_rt.analysis.hardware import HW_FILE, Device, Link, load_hardware
from opdisagg_rt.analysis.models import ModelSpec, load_model
from opdisagg_rt.analysis.ops import OpCost, _attn_out_dim, model_ops
from opdisagg_rt.analysis.stagespec import check_stage_spec
from opdisagg_rt.analysis.workload import Workload

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
MEM_USABLE = 0.9  # leave room for activations, workspace, fragmentation
MICRO_BATCHES = (1, 2, 4, 8)
PROJ = ("attn_norm", "qkv_proj", "o_proj", "mlp_norm")
IO = ("embed", "final_norm", "lm_head")


@dataclass(slots=True)
class Ctx:
    model: ModelSpec
    w: Workload
    devs: dict[str, Device]
    pool: dict[str, int]
    dtype: str
    link: Link | None
    classes: dict[tuple[str, bool], list[int]]  # (attn kind, moe) -> layer indices
    ops: dict[int, dict[str, OpCost]]  # micro-batches -> op name -> cost of one micro-batch
    full_ops: dict[str, OpCost]  # whole batch (memory capacity)
    cache: dict


def parse_pool(text: str) -> dict[str, int]:
    pool = {}
    for part in text.split(","):
        name, _, n = part.strip().partition(":")
        try:
            pool[name] = int(n or 1)
        except ValueError:
            raise ValueError(f"bad --pool entry {part!r}: expected DEVICE:COUNT") from None
    return pool


def _group_of(op: str, l) -> str:
    if op in IO:
        return "io"
    role = op.split(".", 2)[2]
    if role == "attn":
        return f"attn[{l.attn}]"
    if role in PROJ:
        return f"proj[{l.attn}]"
    return "moe" if role == "moe" else "mlp"


def _shard(o: OpCost, n: int) -> OpCost:
    """Tensor parallel over n devices: heads / columns split evenly."""
    if n == 1:
        return o
    return dataclasses.replace(o, flops=o.flops / n, weight_bytes=o.weight_bytes / n, state_bytes=o.state_bytes / n,
                               act_bytes=o.act_bytes / n, gemms=[(M, K, N / n, c) for M, K, N, c in o.gemms],
                               scores=o.scores / n, ew_elems=o.ew_elems / n)


def _op_time(ctx: Ctx, m: int, name: str, dev: str, n: int) -> tuple[float, str]:
    key = (m, name, dev, n)
    if key not in ctx.cache:
        o = ctx.ops[m][name]
        d = ctx.devs[dev]
        t, bound = d.op_time(_shard(o, n), ctx.dtype)
        if n > 1 and (name.endswith(("o_proj", "mlp", "moe")) or name == "lm_head"):
            # row-parallel output: ring all-reduce of the residual-sized output over the scale-up link
            link = d.links.get("scale_up") or Link("none", 100, 10)
            nbytes = ctx.w.tokens / m * ctx.model.hidden_size * DTYPE_BYTES[ctx.dtype]
            t += 2 * link.latency_us * 1e-6 + 2 * (n - 1) / n * nbytes / (link.gbps * 1e9)
        if name.endswith("moe") and n > 1:
            t *= ctx.w.moe_imbalance  # experts spread over devices wait for the busiest one
        ctx.cache[key] = (t, bound)
    return ctx.cache[key]


def _tensor_bytes(ctx: Ctx, m: int, l) -> dict[str, float]:
    T, b, h = ctx.w.tokens / m, DTYPE_BYTES[ctx.dtype], ctx.model.hidden_size
    i = ctx.classes[(l.attn, l.moe)][0]
    qkv = ctx.ops[m][f"layers.{i}.qkv_proj"].act_bytes / b - T * h  # the projection's output width x T
    return {"residual": T * h * b, "hidden": T * h * b, "qkv": qkv * b, "attn_out": T * _attn_out_dim(ctx.model, l) * b}


# what each role reads and writes (DESIGN: operations declare their tensors)
FLOW = [("attn_norm", ("residual",), ("hidden",)), ("qkv_proj", ("hidden",), ("qkv",)),
        ("attn", ("qkv",), ("attn_out",)), ("o_proj", ("attn_out", "residual"), ("residual",)),
        ("mlp_norm", ("residual",), ("hidden",)), ("ffn", ("hidden", "residual"), ("residual",))]


def _link_time(ctx: Ctx, src: tuple[str, int], dst: tuple[str, int], nbytes: float) -> float:
    link = ctx.link or (ctx.devs[src[0]].links.get("scale_up" if src[0] == dst[0] else "scale_out")) or Link("none", 25, 50)
    return link.latency_us * 1e-6 + nbytes / (link.gbps * 1e9 * min(src[1], dst[1]))  # one NIC per device


def _evaluate(ctx: Ctx, assign: dict[str, tuple[str, int]], m: int) -> dict | None:
    """Step time etc. of a multi-visit plan (assign: group -> (device, count))."""
    busy: dict[tuple[str, int], float] = {}
    comp: dict[tuple[str, int], list[float]] = {}
    step = 0.0
    link_busy = 0.0
    for (kind, moe), idx in ctx.classes.items():
        l = ctx.model.layers[idx[0]]
        sizes = _tensor_bytes(ctx, m, l)
        where = {"residual": assign["mlp" if not moe else "moe"]}
        chain, per_stage, xfer = 0.0, {}, 0.0
        for role, reads, writes in FLOW:
            name = f"layers.{idx[0]}.{('moe' if moe else 'mlp') if role == 'ffn' else role}"
            st = assign[_group_of(name, l)]
            for t in reads:
                if where.get(t, st) != st:
                    x = _link_time(ctx, where[t], st, sizes[t])
                    chain += x
                    xfer += x
            for t in writes:
                where[t] = st
            dt, bound = _op_time(ctx, m, name, *st)
            chain += dt
            per_stage[st] = per_stage.get(st, 0.0) + dt
            c = comp.setdefault(st, [0.0, 0.0])
            c[bound == "memory"] += dt * len(idx) * m
        cycle = max(max(per_stage.values()) * m, chain)
        step += cycle * len(idx)
        link_busy += xfer * m * len(idx)
        for st, t in per_stage.items():
            busy[st] = busy.get(st, 0.0) + t * m * len(idx)
    io = assign["io"]
    first, last = ctx.model.layers[0], ctx.model.layers[-1]
    for l, role in ((first, "attn_norm"), (last, "moe" if last.moe else "mlp")):  # residual into / out of the layers
        st = assign[_group_of(f"layers.0.{role}", l)]
        if st != io:
            x = _link_time(ctx, io, st, ctx.w.tokens / m * ctx.model.hidden_size * DTYPE_BYTES[ctx.dtype])
            step += x
            link_busy += x * m
    for name in IO:
        dt, bound = _op_time(ctx, m, name, *io)
        step += dt * m
        busy[io] = busy.get(io, 0.0) + dt * m
        comp.setdefault(io, [0.0, 0.0])[bound == "memory"] += dt * m
    step = max(step, link_busy)
    stages = {}
    for st in busy:
        c = comp[st]
        stages[st] = {"time_ms": busy[st] * 1e3, "bound": "compute" if c[0] >= c[1] else "memory"}
        if link_busy > 0.9 * step and link_busy >= busy[st]:
            stages[st]["bound"] = "communication"
    return {"step": step, "stages": stages}


def _memory_ok(ctx: Ctx, assign: dict[str, tuple[str, int]]) -> tuple[bool, dict]:
    """Weights + resident KV/state of each stage, per device (TP splits both evenly)."""
    if "group_mem" not in ctx.cache:
        gm: dict[str, float] = {}
        for name, o in ctx.full_ops.items():
            l = ctx.model.layers[int(name.split(".")[1])] if name.startswith("layers.") else None
            g = _group_of(name, l)
            gm[g] = gm.get(g, 0.0) + o.params * DTYPE_BYTES[ctx.dtype] + o.state_resident
        ctx.cache["group_mem"] = gm
    need: dict[tuple[str, int], float] = {}
    for g, v in ctx.cache["group_mem"].items():
        need[assign[g]] = need.get(assign[g], 0.0) + v
    used = {st: v / st[1] / 1e9 for st, v in need.items()}
    return all(used[st] <= ctx.devs[st[0]].mem_gb * MEM_USABLE for st in used), used


def _patterns(ctx: Ctx, groups: list[str]) -> list[str]:
    """Glob patterns for the union of `groups`: `layers.*.role` when the stage has every layer's op."""
    names = ctx.model.op_names()
    mine = [n for n in names if (n in IO and "io" in groups) or
            (n not in IO and _group_of(n, ctx.model.layers[int(n.split(".")[1])]) in groups)]
    pats = [n for n in mine if n in IO]
    roles = dict.fromkeys(n.split(".", 2)[2] for n in mine if n not in IO)
    for r in roles:
        have = [n for n in mine if n not in IO and n.split(".", 2)[2] == r]
        every = [n for n in names if n not in IO and n.split(".", 2)[2] == r]
        pats += [f"layers.*.{r}"] if have == every else have
    return pats


def _spec(ctx: Ctx, assign: dict[str, tuple[str, int]], m: int) -> dict:
    stages: dict[str, dict] = {}
    for st in dict.fromkeys(assign.values()):
        groups = [g for g, s in assign.items() if s == st]
        key = "threads" if st[0] == "cpu" else "count"
        stages[st[0]] = {"device": st[0], key: st[1], "ops": _patterns(ctx, groups)}
    spec = {"stages": stages, "micro_batches": m}
    check_stage_spec(spec, ctx.model.op_names())  # the planner only emits specs the runtime accepts
    return spec


def _result(ctx: Ctx, kind: str, spec: dict | None, step: float, stages: dict, mem: dict) -> dict:
    price = 0.0
    for st in stages:
        p = ctx.devs[st[0]].price_per_hour
        price = None if price is None or p is None else price + p * st[1]
    tps = ctx.w.output_tokens / step
    res = {"kind": kind, "stages": {}, "micro_batches": spec["micro_batches"] if spec else None, "tokens_per_s": tps,
           "usd_per_mtok": price / 3600 / tps * 1e6 if price is not None else None,
           "tpot_ms": step * 1e3, "usd_per_hour": price, "spec": spec,
           "_stages": stages, "_mem": mem, "_key": tuple(sorted(stages))}
    if spec:
        for name, s in spec["stages"].items():
            st = (s["device"], s.get("count", s.get("threads")))
            res["stages"][name] = {"device": s["device"], "count": st[1], "ops": s["ops"], "bound": stages[st]["bound"],
                                   "busy_ms": round(stages[st]["time_ms"], 4), "mem_gb_per_device": round(mem[st], 2)}
    return res


def _layer_pipeline(ctx: Ctx, types: list[tuple[str, int]], m: int) -> dict | None:
    """Contiguous layers over the device types (each a TP group), balanced by predicted time."""
    if len(types) < 2:
        return None
    L = ctx.model.num_layers
    names = lambda i: [f"layers.{i}.{r}" for r in ("attn_norm", "qkv_proj", "attn", "o_proj", "mlp_norm",
                                                    "moe" if ctx.model.layers[i].moe else "mlp")]
    per = {st: [sum(_op_time(ctx, m, n, *st)[0] for n in names(i)) for i in range(L)] for st in types}
    a, b = types
    best = None
    for k in range(1, L):
        ta = sum(per[a][:k]) + _op_time(ctx, m, "embed", *a)[0]
        tb = sum(per[b][k:]) + sum(_op_time(ctx, m, n, *b)[0] for n in IO[1:])
        if best is None or max(ta, tb) < best[0]:
            best = (max(ta, tb), k, ta, tb)
    _, k, ta, tb = best
    x = _link_time(ctx, a, b, ctx.w.tokens / m * ctx.model.hidden_size * DTYPE_BYTES[ctx.dtype])
    step = ta + tb + x + (m - 1) * max(ta, tb, x)
    spec = {"stages": {"pp0": {"device": a[0], "count": a[1], "ops": ["embed"] + [n for i in range(k) for n in names(i)]},
                       "pp1": {"device": b[0], "count": b[1], "ops": [n for i in range(k, L) for n in names(i)] + list(IO[1:])}},
            "micro_batches": m}
    # memory per stage
    need = {a: 0.0, b: 0.0}
    for name, o in ctx.full_ops.items():
        st = a if name == "embed" or (name.startswith("layers.") and int(name.split(".")[1]) < k) else b
        need[st] += o.params * DTYPE_BYTES[ctx.dtype] + o.state_resident
    mem = {st: v / st[1] / 1e9 for st, v in need.items()}
    if any(mem[st] > ctx.devs[st[0]].mem_gb * MEM_USABLE for st in mem):
        return None
    stages = {a: {"time_ms": ta * m * 1e3, "bound": "compute"}, b: {"time_ms": tb * m * 1e3, "bound": "compute"}}
    for st in (a, b):  # bound by the majority of its time
        rng = range(k) if st == a else range(k, L)
        c = [0.0, 0.0]
        for i in rng:
            for n in names(i):
                t, bd = _op_time(ctx, m, n, *st)
                c[bd == "memory"] += t
        stages[st]["bound"] = "compute" if c[0] >= c[1] else "memory"
    return _result(ctx, "layer-pipeline", spec, step, stages, mem)


def _counts(n: int) -> list[int]:
    return sorted({c for c in (1, 2, 4, 8, 16, 32) if c <= n} | {n})


def plan(model: str | ModelSpec, w: Workload, pool: str | dict, objective: str = "per_dollar",
         tpot_ms: float | None = None, dtype: str = "bf16", link: str | None = None,
         hardware_file: str | None = None, top: int = 8) -> dict:
    """Rank placements of `model` serving `w` on `pool`. Returns {"plans": [...best first], "considered": n}."""
    mdl = load_model(model) if isinstance(model, str) else model
    devs = load_hardware(hardware_file)
    pool = parse_pool(pool) if isinstance(pool, str) else dict(pool)
    for d in pool:
        if d not in devs:
            raise ValueError(f"unknown device {d!r} in pool; known: {', '.join(sorted(devs))}")
        if objective == "per_dollar" and devs[d].price_per_hour is None:
            raise ValueError(f"device {d!r} has no price_per_hour; set one in a --hardware-file YAML")
    lk = None
    if link:
        links = {l.name: l for dv in devs.values() for l in dv.links.values()}
        for k, v in yaml.safe_load(HW_FILE.read_text())["links"].items():
            links.setdefault(k, Link(k, float(v["gbps"]), float(v["latency_us"])))
        if link not in links:
            raise ValueError(f"unknown link {link!r}; known: {', '.join(sorted(links))}")
        lk = links[link]
    classes: dict[tuple[str, bool], list[int]] = {}
    for i, l in enumerate(mdl.layers):
        classes.setdefault((l.attn, l.moe), []).append(i)
    b = DTYPE_BYTES[dtype]
    ctx = Ctx(mdl, w, devs, pool, dtype, lk, classes,
              {m: {o.op: o for o in model_ops(mdl, w.scaled(1 / m), b)} for m in MICRO_BATCHES},
              {o.op: o for o in model_ops(mdl, w, b)}, {})
    groups = sorted({_group_of(n, mdl.layers[int(n.split(".")[1])] if n.startswith("layers.") else None)
                     for n in mdl.op_names()})
    types = list(pool)
    results, considered = [], 0
    for combo in itertools.product(types, repeat=len(groups)):
        used = sorted(set(combo))
        for counts in itertools.product(*[_counts(pool[t]) for t in used]):
            cnt = dict(zip(used, counts))
            assign = {g: (t, cnt[t]) for g, t in zip(groups, combo)}
            ok, mem = _memory_ok(ctx, assign)
            if not ok:
                continue
            for m in MICRO_BATCHES if len(used) > 1 else (1,):
                considered += 1
                ev = _evaluate(ctx, assign, m)
                kind = "homogeneous" if len(used) == 1 else "op-disaggregated"
                results.append((ev, assign, m, kind, mem))
    ranked = []
    for ev, assign, m, kind, mem in results:  # specs are built lazily: only for the plans printed
        r = _result(ctx, kind, None, ev["step"], ev["stages"], mem)
        r["_build"] = (assign, m)
        ranked.append(r)
    if len(types) >= 2:
        for ca in _counts(pool[types[0]]):
            for cb in _counts(pool[types[1]]):
                for m in MICRO_BATCHES:
                    considered += 1
                    r = _layer_pipeline(ctx, [(types[0], ca), (types[1], cb)], m)
                    if r:
                        ranked.append(r)
    if tpot_ms is not None:
        ranked = [r for r in ranked if r["tpot_ms"] <= tpot_ms]
    for r in ranked:
        r["_key"] = (r["_key"], r["micro_batches"] or r["_build"][1])
    if objective == "per_dollar":
        ranked.sort(key=lambda r: (r["usd_per_mtok"], -r["tokens_per_s"]))
    else:
        ranked.sort(key=lambda r: -r["tokens_per_s"])
    best, seen = [], set()
    for r in ranked:  # top plans, then the best of each kind as baselines for comparison
        key = (r["kind"], r["_key"])
        if len(best) < top and key not in seen:
            best.append(r)
            seen.add(key)
    for kind in ("homogeneous", "layer-pipeline", "op-disaggregated"):
        if not any(r["kind"] == kind for r in best):
            first = next((r for r in ranked if r["kind"] == kind), None)
            if first:
                best.append(first)
    for i, r in enumerate(best):
        if "_build" in r:
            assign, m = r["_build"]
            best[i] = _result(ctx, r["kind"], _spec(ctx, assign, m), r["tpot_ms"] / 1e3, r["_stages"], r["_mem"])
        best[i] = {k: v for k, v in best[i].items() if not k.startswith("_")}
    return {"model": mdl.name, "objective": objective, "considered": considered, "plans": best}


def format_plans(res: dict, out: str | None = None) -> str:
    lines = [f"{res['model']}: {res['considered']} placements considered, objective {res['objective']}"]
    lines.append(f"{'#':>2} {'kind':17s} {'tok/s':>10s} {'$/Mtok':>8s} {'TPOT ms':>8s} {'mb':>3s}  stages (device x count: ops [bound])")
    for i, p in enumerate(res["plans"]):
        st = "; ".join(f"{s['device']}x{s['count']}: {', '.join(s['ops'][:4])}{' ...' if len(s['ops']) > 4 else ''} [{s['bound']}]"
                       for s in p["stages"].values())
        usd = f"{p['usd_per_mtok']:8.3f}" if p["usd_per_mtok"] is not None else "     n/a"
        lines.append(f"{i + 1:>2} {p['kind']:17s} {p['tokens_per_s']:10.0f} {usd} {p['tpot_ms']:8.2f} {p['micro_batches']:>3d}  {st}")
    if out:
        lines.append(f"best plan written to {out}")
    return "\n".join(lines)
