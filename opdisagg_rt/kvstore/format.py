"""Entry format: a small fixed header, the chunk's token ids, then the raw tensor bytes. No pickle.

    magic "OPDKV" | version u16 | dtype code u8 | ndim u8 | shape u32[ndim] | key 16B |
    fields_len u16 | fields utf-8 | num_tokens u32 | crc32 u32 | tokens i32[num_tokens] | payload

The crc32 covers everything after it (tokens and payload) and the header before it, so flipped
bytes anywhere are caught; the length check catches truncation; the key, fields and tokens are
compared with what the reader expects, so a misplaced or stale entry is a miss, never wrong KV.
"""
from __future__ import annotations

import struct
import warnings
import zlib
from array import array

import torch

MAGIC = b"OPDKV"
VERSION = 1
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_CODES = {v: k for k, v in _DTYPES.items()}
_FIXED = struct.Struct("<5sHBB")


class CorruptEntry(ValueError):
    """The entry cannot be trusted: the caller drops it and recomputes."""


def encode(key: bytes, fields: str, token_ids: list[int], tensor: torch.Tensor) -> bytearray:
    t = tensor.contiguous()
    f = fields.encode()
    head = (_FIXED.pack(MAGIC, VERSION, _CODES[t.dtype], t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
            + key + struct.pack("<H", len(f)) + f + struct.pack("<I", len(token_ids)))
    toks = array("i", token_ids).tobytes()
    nbytes = t.numel() * t.element_size()
    # One copy of the payload, straight into the entry (bfloat16 goes through a uint8 view:
    # numpy has no bfloat16).
    buf = bytearray(len(head) + 4 + len(toks) + nbytes)
    mv = memoryview(buf)
    mv[:len(head)] = head
    off = len(head) + 4
    mv[off:off + len(toks)] = toks
    if nbytes:
        mv[off + len(toks):] = memoryview(t.view(-1).view(torch.uint8).numpy())
    crc = zlib.crc32(mv[off + len(toks):], zlib.crc32(toks, zlib.crc32(head)))
    struct.pack_into("<I", buf, len(head), crc)
    return buf


def decode(blob: bytes | bytearray | memoryview, key: bytes, fields: str, token_ids: list[int] | None = None,
           verify: bool = True) -> torch.Tensor:
    """The entry's tensor (a view of `blob`, no copy), or CorruptEntry. `verify=False` skips
    only the checksum (for bytes that never left this process); the structure checks stay."""
    mv = memoryview(blob)
    try:
        magic, version, code, ndim = _FIXED.unpack_from(mv, 0)
        if magic != MAGIC or version != VERSION or code not in _DTYPES:
            raise CorruptEntry(f"bad magic/version/dtype ({magic!r}, {version}, {code})")
        off = _FIXED.size
        shape = struct.unpack_from(f"<{ndim}I", mv, off)
        off += 4 * ndim
        got_key = bytes(mv[off:off + len(key)])
        off += len(key)
        (flen,) = struct.unpack_from("<H", mv, off)
        got_fields = bytes(mv[off + 2:off + 2 + flen]).decode("utf-8", "replace")
        off += 2 + flen
        (ntok,) = struct.unpack_from("<I", mv, off)
        off += 4
        head_end = off
        (crc,) = struct.unpack_from("<I", mv, off)
        off += 4
    except struct.error as e:
        raise CorruptEntry(f"truncated header: {e}") from None
    if got_key != key:
        raise CorruptEntry("key mismatch")
    if got_fields != fields:
        raise CorruptEntry(f"key fields mismatch: {got_fields!r} != {fields!r}")
    dtype = _DTYPES[code]
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if len(mv) != off + 4 * ntok + nbytes:
        raise CorruptEntry(f"size {len(mv)} != expected {off + 4 * ntok + nbytes} (truncated?)")
    toks, payload = mv[off:off + 4 * ntok], mv[off + 4 * ntok:]
    if verify and zlib.crc32(payload, zlib.crc32(toks, zlib.crc32(mv[:head_end]))) != crc:
        raise CorruptEntry("checksum mismatch")
    if token_ids is not None and _ints(toks) != list(token_ids):
        raise CorruptEntry("token ids mismatch")  # a hash collision becomes a miss
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only bytes are fine: the tensor is only read (scattered)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(shape)


def _ints(buf: memoryview) -> list[int]:
    a = array("i")
    a.frombytes(buf)
    return a.tolist()
