"""Wiring: which endpoint each process uses for each peer, for the shm and dist transports.

Channels: engine -> stage (`ctrl`: step metadata and commands), stage -> engine (`to_driver`:
logits and replies), and one per (src, dst) pair of stages that the stage graph says exchange
activations.
"""
from __future__ import annotations

from opdisagg_rt.disagg.graph import DRIVER


def open_worker_endpoints(cfg: dict, endpoints: dict):
    """-> per stream [(ctrl, to_driver, inputs {src: ep}, outputs {dst: ep})], contains(ep, tensor) or None."""
    if endpoints["kind"] == "shm":
        from opdisagg_rt.disagg.transport.shm import ShmRing
        out = []
        for st in endpoints["streams"]:
            ctrl = ShmRing.open(st["ctrl"], create=False)
            to_driver = ShmRing.open(st["to_driver"], create=False)
            inputs = {src: ShmRing.open(r, create=False) for src, r in st["inputs"].items()}
            outputs = {dst: ShmRing.open(r, create=False) for dst, r in st["outputs"].items()}
            out.append((ctrl, to_driver, inputs, outputs))
        return out, lambda ep, t: ep.seg.contains(t)
    from opdisagg_rt.disagg.transport.dist import DistEndpoint, init_dist
    init_dist(endpoints["rank"], endpoints["world"], cfg["device"])
    out = []
    for k in range(endpoints["streams"]):  # a stream is a message tag: FIFO per (peer, tag)
        ep = {name: DistEndpoint(r, cfg["device"], blocking=True, tag=k)
              for name, r in endpoints["ranks"].items() if name != cfg["stage"]}
        out.append((ep[DRIVER], ep[DRIVER], ep, ep))
    return out, None
