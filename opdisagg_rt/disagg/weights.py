"""Building only some operations of a model.

Stage workers get the weights through one shared-memory segment that the engine fills once at
start-up (re-parsing the GGUF in every worker costs ~6 s each); a worker copies out only the
tensors of its own operations and builds the other operations on the meta device (shapes, no
data), then drops them. The engine itself builds all operations on meta to read their names,
tensor declarations and attention shapes.
"""
from __future__ import annotations

import json
import re

import torch

from opdisagg_rt.disagg.transport import DTYPE_NAMES, DTYPES
from opdisagg_rt.disagg.transport.shm import ShmSegment, _align, new_name
from opdisagg_rt.layers.base import Op
from opdisagg_rt.models.loader import LoadedModel
from opdisagg_rt.models.registry import build_model_ops

# Which checkpoint tensors (transformers names, below `model.layers.{i}.`) each operation reads.
# `post_attention_layernorm` is Llama's pre-MLP norm but Gemma-3's post-attention norm (applied in
# o_proj, with `pre_feedforward_layernorm` before the MLP and `post_feedforward_layernorm` in it):
# both ops list it, a stage may import one small vector it does not use.
# Linear-attention layers: Qwen3-Next's Gated DeltaNet (`linear_attn.*`) and MiniMax's Lightning
# attention (`self_attn.qkv_proj`, `output_gate`, `norm`, `out_proj`, `slope_rate`).
_LAYER_WEIGHTS = {"attn_norm": ("input_layernorm.",),
                  "qkv_proj": ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.",
                               "self_attn.q_norm.", "self_attn.k_norm.", "self_attn.qkv_proj.",
                               "self_attn.output_gate.", "linear_attn.in_proj_"),
                  "o_proj": ("self_attn.o_proj.", "post_attention_layernorm.", "self_attn.out_proj.",
                             "self_attn.norm.", "linear_attn.out_proj."),
                  "mlp_norm": ("post_attention_layernorm.", "pre_feedforward_layernorm."),
                  "mlp": ("mlp.", "post_feedforward_layernorm."), "moe": ("mlp.", "block_sparse_moe."),
                  "attn": ("self_attn.sinks", "self_attn.slope_rate", "linear_attn.conv1d.", "linear_attn.A_log",
                           "linear_attn.dt_bias", "linear_attn.norm.")}


def op_weight_names(op: str, names: list[str]) -> list[str]:
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", op)
    if m:
        prefixes = tuple(f"model.layers.{m.group(1)}.{p}" for p in _LAYER_WEIGHTS[m.group(2)])
        return [n for n in names if prefixes and n.startswith(prefixes)]
    if op == "embed":
        return ["model.embed_tokens.weight"]
    if op == "final_norm":
        return ["model.norm.weight"]
    if op == "lm_head":  # plus the matrix's GGUF block form (`name.kind`), if exported
        w = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
        return [w] + [n for n in names if n.startswith(w + ".")]
    raise ValueError(f"no weight mapping for operation {op!r}")


def build_ops_partial(loaded: LoadedModel, dtype: torch.dtype, max_positions: int, weights: dict,
                      keep: set[str] | None = None) -> list[Op]:
    """Build every op; tensors missing from `weights` are placeholders: views of one buffer (for
    `keep`, filled with NaN, so a kept op built from a missing tensor is caught even when it
    holds a tensor derived from it, e.g. Gemma's 1 + w norm weights). Not meta tensors: torch.cat
    on meta imports the whole decomposition machinery (~5 s per process)."""
    shapes = {k: v for k, v in loaded.weights.items() if k not in weights}
    big = max((v.numel() for v in shapes.values()), default=0)
    pool = {dt: torch.empty(big, dtype=dt) for dt in {v.dtype for v in shapes.values()}}
    if keep is not None:
        for b in pool.values():
            if b.is_floating_point():
                b.fill_(float("nan"))
    full = {k: weights[k] if k in weights else pool[v.dtype][:v.numel()].view(v.shape) for k, v in loaded.weights.items()}
    ops = build_model_ops(LoadedModel(loaded.config, full, loaded.tokenizer, loaded.fingerprint, loaded.source),
                          dtype, max_positions)
    if keep is None:
        return ops
    ops = [op for op in ops if op.name in keep]
    spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in pool.values()]
    for op in ops:  # a kept op must not hold a placeholder: that would be a gap in op_weight_names
        bad = [k for k, p in op.parameters().items() if any(lo <= p.data_ptr() < hi for lo, hi in spans)
               or (p.is_floating_point() and bool(p.isnan().any()))]
        if bad:
            raise RuntimeError(f"operation {op.name!r} was built without its weights {bad}")
    return ops


def meta_ops(loaded: LoadedModel, dtype: torch.dtype, max_positions: int) -> list[Op]:
    """All ops with placeholder weights: for their names, declared tensors and shapes only."""
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in loaded.weights.items()}
    return build_ops_partial(LoadedModel(loaded.config, shapes, loaded.tokenizer, loaded.fingerprint, loaded.source),
                             dtype, max_positions, {})


def export_weights(weights: dict[str, torch.Tensor]) -> tuple[ShmSegment, dict]:
    """Copy the checkpoint once into a new segment; returns it and its JSON-able index."""
    index, off = {}, 0
    for k, v in weights.items():
        index[k] = [DTYPE_NAMES[v.dtype], list(v.shape), off]
        off = _align(off + v.numel() * v.element_size())
    seg = ShmSegment(new_name("weights"), max(off, 64), create=True)
    for k, v in weights.items():
        n = v.numel() * v.element_size()
        seg.buf[index[k][2]:index[k][2] + n].view(v.dtype).view(v.shape).copy_(v)
    return seg, {"segment": seg.name, "size": seg.size, "index": index}


def import_weights(desc: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Private copies of the named tensors out of the engine's weight segment."""
    seg = ShmSegment(desc["segment"], desc["size"], create=False)
    out = {}
    for k in names:
        dtype, shape, off = desc["index"][k]
        dt = DTYPES[dtype]
        n = dt.itemsize * int(torch.Size(shape).numel())
        out[k] = seg.buf[off:off + n].view(dt).view(shape).clone()
    seg.close()
    return out


def index_shapes(desc: dict) -> dict[str, torch.Tensor]:
    """Meta tensors standing for every checkpoint tensor (for building placeholders)."""
    return {k: torch.empty(shape, dtype=DTYPES[dt], device="meta") for k, (dt, shape, _) in desc["index"].items()}


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))
