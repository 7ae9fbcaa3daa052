"""`python -m opdisagg_rt.disagg.overhead`: the cost of one visit beyond its compute.

Runs a multi-visit spec (two stages alternating every layer: 60 visits per step on SmolLM2) with
one micro-batch and one stream, so nothing overlaps: a decode step's wall time is the stages'
compute plus the hand-offs (receive, send, wake-ups) plus the engine's own work per step. Tiny
batches keep the compute small, so the difference is mostly per-visit overhead:

    overhead per visit = (step wall time - compute of every stage) / visits per step

(the engine's per-step work is counted in too, spread over the visits: an upper bound).
Also, with or without streams, the hand-off latency from the stages' traces: from the moment a
visit could have started (its predecessor done, its stage free) to its start.
"""
from __future__ import annotations

import argparse
import json
import time

ALTERNATE = {"attn_block": ["embed", "layers.*.attn_norm", "layers.*.qkv_proj", "layers.*.attn", "layers.*.o_proj"],
             "mlp_block": ["layers.*.mlp_norm", "layers.*.mlp", "final_norm", "lm_head"]}


def measure(num_requests: int = 2, output_len: int = 48, streams: bool = False, model: str | None = None) -> dict:
    from opdisagg_rt.engine import Engine
    from opdisagg_rt.models.loader import load_model
    from opdisagg_rt.sampling import SamplingParams
    loaded = load_model(model)
    spec = {"stages": {k: {"device": "cpu", "threads": 1, "ops": v} for k, v in ALTERNATE.items()},
            "micro_batches": 2 if streams else 1, "streams": streams}
    eng = Engine(loaded, dtype="float32", stage_spec=spec)
    try:
        runner = eng.runner
        prompts = [[1000 + 7 * i + j for j in range(8)] for i in range(num_requests)]
        eng.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
        before = {k: v["busy_s"] for k, v in runner.stats()["stages"].items()}
        steps0 = runner.counters["steps"]
        t0 = time.perf_counter()
        eng.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False)
        wall = time.perf_counter() - t0
        st = runner.stats(trace=True)
        after = {k: v["busy_s"] for k, v in st["stages"].items()}
        units = sorted((*u, k) for k, v in st["stages"].items() for u in v["trace"] if u[0] >= t0)
        steps = runner.counters["steps"] - steps0
        visits = len(runner.graph.visits)
    finally:
        eng.shutdown()
    busy = {k: after[k] - before[k] for k in after}
    step_ms = 1e3 * wall / steps
    compute_ms = 1e3 * sum(busy.values()) / steps
    res = {"streams": streams, "num_requests": num_requests, "steps": steps, "visits_per_step": visits,
           "step_ms": step_ms, "compute_ms_per_step": compute_ms,
           "busy_fraction": {k: v / wall for k, v in busy.items()}}
    if not streams:  # nothing overlaps: the rest of the step is overhead
        res["overhead_us_per_visit"] = 1e3 * (step_ms - compute_ms) / visits
    res.update(handoffs(units))
    return res


def handoffs(units: list) -> dict:
    """From the stages' traces [(start, end, micro-batch, visit, stage)]: a visit could start once
    its predecessor (same micro-batch, previous visit, another stage) had ended and its own stage
    had finished its previous unit; from then to its start is the hand-off (send, wake-up,
    receive, locks, GIL). Visit 0 follows the engine's turn (sampling, scheduling): left out."""
    prev_end = {}        # (mb, visit) -> end
    stage_free: dict = {}  # stage -> end of its last unit
    inner, by_stage = [], {}
    for start, end, mb, v, stage in units:  # sorted by start
        ready = max(prev_end.get((mb, v - 1), start), stage_free.get(stage, 0.0))
        if v > 0 and (mb, v - 1) in prev_end:
            inner.append(1e6 * max(0.0, start - ready))
            by_stage.setdefault(stage, []).append(inner[-1])
        prev_end[(mb, v)] = end
        stage_free[stage] = end
    inner.sort()
    if not inner:
        return {}
    return {"handoff_us_p50": inner[len(inner) // 2], "handoff_us_p90": inner[len(inner) * 9 // 10],
            "handoff_us_mean": sum(inner) / len(inner), "handoffs": len(inner),
            "handoff_us_mean_into": {k: sum(v) / len(v) for k, v in by_stage.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m opdisagg_rt.disagg.overhead", description=__doc__)
    ap.add_argument("--num-requests", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--streams", action="store_true", help="two streams (micro_batches 2): the bench's mode")
    ap.add_argument("--model", default=None)
    a = ap.parse_args(argv)
    res = measure(a.num_requests, a.output_len, a.streams, a.model)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
