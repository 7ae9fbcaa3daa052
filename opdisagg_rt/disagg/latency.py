"""`python -m opdisagg_rt.disagg.latency`: one-way per-visit transfer latency of the same
activations over the shm ring and over torch.distributed (gloo), between two processes.

A ping-pong of `rows` x `width` float32 activations (q,k,v of a decode step, by default);
latency = round trip / 2.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.multiprocessing as tmp


def _peer(kind: str, spec: dict, n: int) -> None:
    torch.set_num_threads(1)
    if kind == "shm":
        from opdisagg_rt.disagg.transport.shm import ShmRing
        rx, tx = ShmRing.open(spec["a2b"], create=False), ShmRing.open(spec["b2a"], create=False)
    else:
        from opdisagg_rt.disagg.transport.dist import DistEndpoint, init_dist
        init_dist(1, 2, "cpu")
        rx = tx = DistEndpoint(0, blocking=True)
    for _ in range(n):
        _, ts = rx.recv()
        tx.send({}, ts)  # echo straight from the received slot
        rx.release()
    if kind == "dist":
        from opdisagg_rt.disagg.transport.dist import destroy_dist
        destroy_dist()


def measure(kind: str, rows: int, width: int, n: int = 200) -> dict:
    ctx = tmp.get_context("spawn")
    x = torch.randn(rows, width)
    if kind == "shm":
        from opdisagg_rt.disagg.transport.shm import ShmRing
        spec = {"a2b": ShmRing.spec(2, x.numel() * 4 + 4096, ctx), "b2a": ShmRing.spec(2, x.numel() * 4 + 4096, ctx)}
        tx, rx = ShmRing.open(spec["a2b"], create=True), ShmRing.open(spec["b2a"], create=True)
    else:
        from opdisagg_rt.disagg.executor import _free_port
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        spec = {}
    p = ctx.Process(target=_peer, args=(kind, spec, n), daemon=True)
    p.start()
    if kind == "dist":
        from opdisagg_rt.disagg.transport.dist import DistEndpoint, init_dist
        init_dist(0, 2, "cpu")
        tx = rx = DistEndpoint(1, blocking=True)
    times = []
    cpu0 = time.process_time()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            tx.send({}, [x])
            rx.recv()
            rx.release()
            times.append(time.perf_counter() - t0)
    finally:
        cpu = time.process_time() - cpu0
        p.join(30)
        if kind == "shm":
            for r in (tx, rx):
                r.unlink()
        else:
            from opdisagg_rt.disagg.transport.dist import destroy_dist
            destroy_dist()
    times.sort()
    return {"transport": kind, "bytes": x.numel() * 4, "one_way_us_p50": 1e6 * times[len(times) // 2] / 2,
            "one_way_us_p10": 1e6 * times[len(times) // 10] / 2,
            # this side's CPU per message (one send or one receive), the copy included
            "cpu_us_per_message": 1e6 * cpu / (2 * n)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m opdisagg_rt.disagg.latency", description=__doc__)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--width", type=int, default=960, help="960 = q,k,v of SmolLM2")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args(argv)
    res = {k: measure(k, a.rows, a.width, a.n) for k in ("shm", "dist")}
    res["gloo_over_shm"] = res["dist"]["one_way_us_p50"] / res["shm"]["one_way_us_p50"]
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
