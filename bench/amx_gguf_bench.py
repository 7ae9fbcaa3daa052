"""Benchmark of the AMX GGUF projection kernels on SmolLM2's decode shapes.

Fifteen layers of random Q4_1 weights (q, k, v, o, gate, up, down: 53M weights, more than the L2
of a core) plus the Q8_0 tied lm_head (49152 x 576), run back to back as a decode step would,
for 16 rows (a disaggregated micro-batch) and 32 rows (the colocated batch) on 1 and 2 threads.
Prints the median time per pass and ns per k step (32 columns x 32 inputs), and writes JSON.

To compare two builds of the kernel, run this script alternately from two checkouts (a second
one made with `git worktree add`, built with `python setup.py build_ext --inplace`, and run with
PYTHONPATH pointing at it): the host's speed drifts by up to 1.5x within minutes.

Usage: python bench/amx_gguf_bench.py [--reps N] [--json PATH]
"""
import argparse
import json
import time

import torch

from opdisagg_rt import ops

HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 15


def q4_1_blocks(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    kb = k // 32
    d = (torch.rand(n, kb, generator=g) * 0.01 + 1e-4).half().view(torch.uint8).view(n, kb, 2)
    m = (-torch.rand(n, kb, generator=g) * 0.05).half().view(torch.uint8).view(n, kb, 2)
    return torch.cat([d, m, torch.randint(0, 256, (n, kb, 16), dtype=torch.uint8, generator=g)], -1)


def q8_0_blocks(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    kb = k // 32
    d = (torch.rand(n, kb, generator=g) * 0.01 + 1e-4).half().view(torch.uint8).view(n, kb, 2)
    return torch.cat([d, torch.randint(0, 256, (n, kb, 32), dtype=torch.uint8, generator=g)], -1)


def time_pass(calls, reps: int) -> float:
    for fn in calls:
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for fn in calls:
            fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not ops.amx_available():
        raise SystemExit("this CPU (or OS) does not allow AMX-BF16: nothing to measure")
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
              (HIDDEN, INTER)]
    layers = [(ops.pack_weight_amx_q4_1(q4_1_blocks(n, k, g)), n, k) for _ in range(LAYERS) for n, k in shapes]
    head = ops.pack_weight_amx_q8_0(q8_0_blocks(VOCAB, HIDDEN, g))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (16, 32):
            x = {k: torch.randn(rows, k).bfloat16() for k in (HIDDEN, INTER)}
            out = {n: torch.empty(rows, n, dtype=torch.bfloat16) for n in (HIDDEN, KV, INTER, VOCAB)}
            q4 = [lambda p=p, n=n, k=k: ops.linear_amx_q4_1(x[k], p, n, out=out[n]) for p, n, k in layers]
            q8 = [lambda: ops.linear_amx_q8_0(x[HIDDEN], head, VOCAB, out=out[VOCAB])]
            for kind, calls, weights in (("q4_1 layers", q4, sum(n * k for _, n, k in layers)),
                                         ("q8_0 lm_head", q8, VOCAB * HIDDEN)):
                t = time_pass(calls, a.reps)
                r = {"kind": kind, "threads": threads, "rows": rows, "ms": 1e3 * t,
                     "ns_per_k_step": 1e9 * t / (weights / 1024), "gweights_per_s": weights / t / 1e9}
                results.append(r)
                print(f"{kind:13s} threads {threads} rows {rows:2d}: {r['ms']:7.2f} ms  "
                      f"{r['ns_per_k_step']:6.1f} ns/k-step  {r['gweights_per_s']:5.2f} Gweights/s")
    res = {"layers": LAYERS, "reps": a.reps, "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
