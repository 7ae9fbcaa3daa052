"""The DESIGN stage-spec format: {stages: {name: {device, threads|count, ops: [globs]}}, micro_batches: N}.

The planner writes it, the runtime reads it; check_stage_spec() is the one validator both use.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import yaml


class StageSpecError(ValueError):
    pass


def load_stage_spec(src: str | Path | dict) -> dict[str, Any]:
    """A dict, or a .yaml/.yml/.json file (JSON is valid YAML, so any extension parses)."""
    if isinstance(src, dict):
        return src
    text = Path(src).read_text()
    spec = json.loads(text) if str(src).endswith(".json") else yaml.safe_load(text)
    if not isinstance(spec, dict):
        raise StageSpecError(f"{src}: a stage spec is a mapping with 'stages' and 'micro_batches'")
    return spec


def check_stage_spec(spec: dict[str, Any], op_names: list[str]) -> dict[str, str]:
    """Validate `spec` against the model's operation names; return {op: stage}.

    Every operation must match exactly one stage; every pattern must match some operation."""
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), dict) or not spec["stages"]:
        raise StageSpecError("stage spec needs a non-empty mapping 'stages: {name: {device, threads|count, ops}}'")
    mb = spec.get("micro_batches", 1)
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
        raise StageSpecError(f"'micro_batches' must be a positive integer, got {mb!r}")
    owner: dict[str, str] = {}
    known = set(op_names)
    for name, st in spec["stages"].items():
        if not isinstance(st, dict):
            raise StageSpecError(f"stage {name!r}: expected a mapping with device, threads|count, ops")
        if not isinstance(st.get("device"), str) or not st["device"]:
            raise StageSpecError(f"stage {name!r}: missing 'device' (e.g. cpu, cuda:0, h20)")
        for key in ("threads", "count"):
            v = st.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise StageSpecError(f"stage {name!r}: '{key}' must be a positive integer, got {v!r}")
        pats = st.get("ops")
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) for p in pats):
            raise StageSpecError(f"stage {name!r}: 'ops' must be a non-empty list of glob patterns")
        for pat in pats:
            exact = not any(ch in pat for ch in "*?[")
            hits = ([pat] if pat in known else []) if exact else [op for op in op_names if fnmatch.fnmatchcase(op, pat)]
            if not hits:
                raise StageSpecError(f"stage {name!r}: pattern {pat!r} matches no operation of this model")
            for op in hits:
                if owner.get(op, name) != name:
                    raise StageSpecError(f"operation {op!r} is claimed by stages {owner[op]!r} and {name!r}")
                owner[op] = name
    missing = [op for op in op_names if op not in owner]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StageSpecError(f"operation {missing[0]!r}{more} is not assigned to any stage")
    return owner


def dump_stage_spec(spec: dict[str, Any], path: str | Path) -> None:
    text = json.dumps(spec, indent=2) if str(path).endswith(".json") else yaml.safe_dump(spec, sort_keys=False, width=120)
    Path(path).write_text(text)
