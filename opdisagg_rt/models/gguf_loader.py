"""GGUF loader: header parsing, dequantization to float32, llama.cpp -> transformers names.

The header is parsed here with `struct` over an mmap rather than with `gguf.GGUFReader`: the
reader builds a numpy view per string of the vocabulary and takes ~5 s on SmolLM2's 98k
tokens+merges, this takes ~0.3 s. The `gguf` package provides the type tables and the
dequantization of every block format; Q4_0/Q4_1/Q8_0 have faster numpy paths here.
"""
from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from ..config import ModelConfig
from ..tokenizer import Tokenizer

# GGUF architecture -> transformers class; only Llama-family files are understood for now.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

# llama.cpp tensor names -> transformers Llama names (per-layer ones under blk.N / model.layers.N).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

_SCALARS = {  # GGUFValueType -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}


@dataclass(slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest-varying dim first)
    qtype: GGMLQuantizationType
    offset: int  # absolute offset in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF header plus lazy access to the tensor bytes through an mmap."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 4
        if self._mm[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        try:
            self._parse_header()
        except struct.error:
            raise ValueError(f"{path}: truncated GGUF header") from None

    def _parse_header(self) -> None:
        path = self.path
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._enum(GGUFValueType, f"metadata {key}"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            qtype = self._enum(GGMLQuantizationType, f"tensor {name}")
            offset = self._unpack("<Q")
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_el = int(np.prod(dims)) if dims else 1
            infos.append((name, tuple(reversed(dims)), qtype, offset, n_el // block * type_size))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = {n: GGUFTensorInfo(n, s, q, data_start + o, b) for n, s, q, o, b in infos}
        for t in self.tensors.values():
            if t.offset + t.nbytes > len(self._mm):
                raise ValueError(f"{path}: tensor {t.name} extends past the end of the file")

    def _enum(self, cls: type, what: str) -> Any:
        code = self._unpack("<I")
        try:
            return cls(code)
        except ValueError:
            raise ValueError(f"{self.path}: {what}: unknown {cls.__name__} {code}") from None

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        s = self._mm[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype != GGUFValueType.ARRAY:
            return self._unpack(_SCALARS[vtype])
        item_type, count = self._enum(GGUFValueType, "array item"), self._unpack("<Q")
        if item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            return [self._value(item_type) for _ in range(count)]
        # numeric arrays in one go (token types, scores: tens of thousands of entries)
        dtype = np.dtype(_SCALARS[item_type])
        arr = np.frombuffer(self._mm, dtype=dtype, count=count, offset=self._pos)
        self._pos += count * dtype.itemsize
        return arr.tolist()

    def blocks(self, name: str) -> tuple[str, torch.Tensor] | None:
        """A 2-D Q4_1/Q8_0 tensor's kind and raw blocks as uint8 [rows, cols / 32, block bytes]
        (a copy), else None."""
        t = self.tensors[name]
        kind = _STREAMED_KINDS.get(t.qtype)
        if kind is None or len(t.shape) != 2:
            return None
        _, type_size = GGML_QUANT_SIZES[t.qtype]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return kind, torch.from_numpy(raw.reshape(t.shape[0], t.shape[1] // 32, type_size).copy())

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32 (a fresh copy, independent of the mmap)."""
        t = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        if t.qtype in _FAST_DEQUANT:
            return torch.from_numpy(_FAST_DEQUANT[t.qtype](raw).reshape(t.shape))
        rows = raw.reshape(*t.shape[:-1], t.shape[-1] // block * type_size)
        out = dequantize(rows, t.qtype).astype(np.float32, copy=True)
        return torch.from_numpy(out.reshape(t.shape))


# numpy fast paths for the common block formats, ~3x faster than gguf.quants (structured views
# instead of splits and broadcast shifts; torch's uint8 ops were slower still). Same float32
# arithmetic, d * q [+ m], so the results are bit-identical. Layouts: ggml-common.h.
def _blocks(raw: np.ndarray, fields: list[tuple]) -> np.ndarray:
    return raw.view(np.dtype(fields)).reshape(-1)


def _nibbles(qs: np.ndarray, offset: int = 0) -> np.ndarray:
    # low nibbles hold elements 0..15 of a block, high nibbles 16..31
    q = np.empty((qs.shape[0], 32), np.float32)
    q[:, :16] = qs & 0x0F
    q[:, 16:] = qs >> 4
    if offset:
        q -= offset
    return q


def _q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("qs", "u1", (16,))])
    q = _nibbles(b["qs"], 8)
    q *= b["d"].astype(np.float32)[:, None]
    return q


def _q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
    q = _nibbles(b["qs"])
    q *= b["d"].astype(np.float32)[:, None]
    q += b["m"].astype(np.float32)[:, None]
    return q


def _q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("qs", "i1", (32,))])
    q = b["qs"].astype(np.float32)
    q *= b["d"].astype(np.float32)[:, None]
    return q


_FAST_DEQUANT = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
}


def hf_name(gguf_name: str) -> str | None:
    """transformers name of a llama.cpp tensor, or None for tensors with no Llama counterpart."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def gguf_name(hf: str) -> str:
    """Inverse of `hf_name`, for error messages that should name the tensor as the file does."""
    for g, h in _GLOBAL_NAMES.items():
        if hf.startswith(h + "."):
            return g + hf[len(h):]
    m = _HF_LAYER_RE.match(hf)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return hf


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    convert_hf_to_gguf.py reorders each head's rows from transformers' rotate-half RoPE layout
    (first half, second half) to interleaved pairs (llama.cpp's RoPE on adjacent elements):
    rows viewed as [head, 2, dim/2] become [head, dim/2, 2]. Viewing the file's rows as
    [head, dim/2, 2] and swapping back restores transformers' order. Works for biases too.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(meta: dict[str, Any], key: str, path: str, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise ValueError(f"{path}: missing GGUF metadata field {key!r}")
    return default


def gguf_config(g: GGUFFile) -> ModelConfig:
    meta, path = g.metadata, g.path
    arch = _field(meta, "general.architecture", path)
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: unknown architecture {arch!r} (general.architecture); "
            f"supported: {sorted(GGUF_ARCHITECTURES)}"
        )
    hidden = int(_field(meta, f"{arch}.embedding_length", path))
    heads = int(_field(meta, f"{arch}.attention.head_count", path))
    kv_heads = int(_field(meta, f"{arch}.attention.head_count_kv", path, heads))
    head_dim = int(_field(meta, f"{arch}.attention.key_length", path, hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].shape[0]
    if vocab is None:
        raise ValueError(f"{path}: missing GGUF metadata field {arch + '.vocab_size'!r}")
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type,
                        "factor": float(_field(meta, f"{arch}.rope.scaling.factor", path))}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            rope_scaling["original_max_position_embeddings"] = int(
                meta[f"{arch}.rope.scaling.original_context_length"])
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in meta]
    cfg = ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(meta, f"{arch}.feed_forward_length", path)),
        num_hidden_layers=int(_field(meta, f"{arch}.block_count", path)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        # stored as float32 in the file; widened as-is (1e-5 reads 9.9999997e-06, as in transformers)
        rms_norm_eps=float(_field(meta, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-5)),
        rope_theta=float(_field(meta, f"{arch}.rope.freq_base", path, 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_field(meta, f"{arch}.context_length", path, 2048)),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
    )
    # a transformers-style config dict, enough for LlamaConfig(**hf_config) in parity tests
    cfg.hf_config = {
        "model_type": arch, "architectures": [cfg.architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": hidden,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
        "hidden_act": "silu",
    }
    return cfg


# GGUF block formats that bf16 decode projections stream as they are (ops.linear_amx_q4_1 /
# _q8_0); load_gguf also returns such weights' raw blocks.
_STREAMED_KINDS = {GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q8_0: "q8_0"}


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer,
                                  dict[str, tuple[str, torch.Tensor]]]:
    """Config, float32 weights under transformers names (Q/K un-permuted), tokenizer, and the
    raw uint8 blocks of the Q4_1/Q8_0 matrices by the same names: {name: (kind, blocks)}."""
    g = GGUFFile(path)
    config = gguf_config(g)
    weights: dict[str, torch.Tensor] = {}
    block_weights: dict[str, tuple[str, torch.Tensor]] = {}
    for name, info in g.tensors.items():
        target = hf_name(name)
        if target is None:
            # e.g. rope_freqs.weight (Llama-3 RoPE factors): kept under its GGUF name
            target = name
        try:
            w = g.tensor(name)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{path}: cannot dequantize tensor {name} ({info.qtype.name}): {e}") from e
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        n_head = heads.get(name.split(".")[2] if name.startswith("blk.") else "")
        # a wrongly shaped Q/K is left as it is: load_model's shape check names it
        blocks = g.blocks(name)
        if n_head and w.shape[0] == n_head * config.head_dim:
            w = unpermute_rows(w, n_head)
            blocks = (blocks[0], unpermute_rows(blocks[1], n_head)) if blocks is not None else None
        weights[target] = w
        if blocks is not None:  # the block form too: bf16 decode GEMMs stream it (Linear.use_gguf)
            block_weights[target] = blocks
    return config, weights, Tokenizer.from_gguf_metadata(g.metadata, source=path), block_weights
