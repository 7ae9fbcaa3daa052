"""Stage specs for the runtime: the DESIGN format (validated by analysis.stagespec) resolved
against a model's operation names, plus the runtime-only checks (devices, transport).

    stages:
      rest: {device: cpu, threads: 1, ops: ["embed", "layers.*.attn_norm", ...]}
      attn: {device: cpu, threads: 1, ops: ["layers.*.attn"]}
    micro_batches: 2
    transport: shm        # runtime extension: shm (default) | dist (torch.distributed, env://)
    timeout_s: 120        # runtime extension: a stage silent this long is declared hung
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdisagg_rt.analysis.stagespec import StageSpecError, check_stage_spec, load_stage_spec

logger = logging.getLogger(__name__)
__all__ = ["StageSpecError", "Stage", "StageSpec", "parse_stage_spec", "parse_device"]

TRANSPORTS = ("shm", "dist")
# cpu | cuda | cuda:N, optionally behind "host:" (a stage on another machine).
_DEVICE = re.compile(r"^(?:(?P<host>[A-Za-z0-9_.\-]+):)??(?P<dev>cpu|cuda(?::\d+)?)$")


def _catalog() -> set[str]:
    try:
        from opdisagg_rt.analysis.hardware import load_hardware
        return set(load_hardware())
    except Exception:  # noqa: BLE001 - the catalog is optional here
        return set()


def parse_device(device: str) -> tuple[str | None, str]:
    """`cpu`, `cuda:1`, `node7:cuda:0` -> (host or None, torch device string). A device type of the
    cost model's catalog (`h20`, as the planner writes) runs on cuda:0 if present, else the CPU."""
    m = _DEVICE.match(device) if isinstance(device, str) else None
    if m is None and isinstance(device, str) and device in _catalog():
        import torch
        local = "cuda:0" if torch.cuda.is_available() else "cpu"
        logger.warning("device %r is a cost-model device type: running its stage on %s", device, local)
        return None, local
    if m is None:
        raise StageSpecError(f"unknown device {device!r}: the runtime places stages on cpu, cuda, cuda:N "
                             f"or host:<one of these>")
    return m.group("host"), m.group("dev")


@dataclass(slots=True)
class Stage:
    name: str
    index: int
    device: str          # torch device of the worker (cpu, cuda:N)
    host: str | None     # None = this machine
    threads: int         # intra-op threads of the worker process
    count: int           # workers (tensor parallel); only 1 is implemented
    ops: list[str]       # operation names it owns, in forward order


@dataclass(slots=True)
class StageSpec:
    stages: list[Stage]
    owner: dict[str, str]  # op name -> stage name
    micro_batches: int
    transport: str
    timeout_s: float
    raw: dict[str, Any]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse_stage_spec(src: str | Path | dict, op_names: list[str]) -> StageSpec:
    """Load (YAML/JSON path or dict) and resolve against the model's op names; every problem is a
    StageSpecError naming the stage, pattern, operation or device at fault."""
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise StageSpecError(f"stage spec file not found: {src}")
    raw = load_stage_spec(src)
    owner = check_stage_spec(raw, op_names)
    stages = []
    for i, (name, st) in enumerate(raw["stages"].items()):
        host, dev = parse_device(st["device"])
        if dev.startswith("cuda"):
            import torch  # CUDA stages only make sense where CUDA exists
            if not torch.cuda.is_available():
                raise StageSpecError(f"stage {name!r}: device {st['device']!r} needs CUDA, which is not available")
        count = int(st.get("count", 1) or 1)
        # On the CPU a "device" of the planner is a core: count cores = one process with count threads.
        threads = int(st.get("threads") or (count if dev == "cpu" else 1))
        if dev != "cpu" and count > 1:
            raise StageSpecError(f"stage {name!r}: count={count} (tensor parallel) is not implemented")
        stages.append(Stage(name, i, dev, host, threads, count, [op for op in op_names if owner[op] == name]))
    transport = raw.get("transport", "shm")
    if transport not in TRANSPORTS:
        raise StageSpecError(f"unknown transport {transport!r} (use one of {', '.join(TRANSPORTS)})")
    if transport == "shm" and any(s.host for s in stages):
        bad = next(s for s in stages if s.host)
        raise StageSpecError(f"stage {bad.name!r} is on host {bad.host!r}: shared memory needs one host; "
                             f"use transport: dist")
    timeout = raw.get("timeout_s", 120.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise StageSpecError(f"'timeout_s' must be a positive number of seconds, got {timeout!r}")
    return StageSpec(stages, owner, raw.get("micro_batches", 1), transport, float(timeout), raw)
