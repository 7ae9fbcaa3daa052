"""Zero-copy same-host transport: a ring of preallocated slots in one /dev/shm file per channel.

The sender copies each activation once, straight into the next free slot; the receiver gets
tensors that are views of that slot (no pickling, no second copy) and computes on them in
place, then `release()`s the slot. Two counting semaphores (filled / free slots) order the two
sides; waits time out periodically so a dead peer is noticed. Segments are plain files under
/dev/shm (not multiprocessing.shared_memory, whose resource tracker unlinks segments behind our
back), created and unlinked only by the engine process.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import uuid
from collections import deque
from typing import Callable, Sequence

import torch

from opdisagg_rt.disagg.transport import DTYPE_NAMES, DTYPES, HEADER_JSON

SHM_DIR = "/dev/shm"
PREFIX = "opdisagg-"
ALIGN = 64
POLL_S = 0.05

Poll = Callable[[], None]


def new_name(tag: str) -> str:
    return f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{tag}"


def sweep_stale() -> list[str]:
    """Remove segments left by engine processes that died without cleaning up (SIGKILL, SIGTERM):
    the creator's pid is in every name."""
    gone = []
    for name in os.listdir(SHM_DIR):
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                gone.append(name)
            except FileNotFoundError:
                pass
        except (ValueError, PermissionError):
            pass
    return gone


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ShmSegment:
    """A named /dev/shm file mapped into this process, seen as a uint8 tensor."""

    __slots__ = ("name", "size", "mm", "buf")

    def __init__(self, name: str, size: int, create: bool):
        self.name, self.size = name, size
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else os.O_RDWR, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # pages are allocated lazily, on first write
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)

    @classmethod
    def anonymous(cls, size: int) -> "ShmSegment":
        """A private mapping with the same interface (no file)."""
        seg = cls.__new__(cls)
        seg.name, seg.size, seg.mm = "", size, mmap.mmap(-1, size)
        seg.buf = torch.frombuffer(seg.mm, dtype=torch.uint8)
        return seg

    def contains(self, t: torch.Tensor) -> bool:
        base = self.buf.data_ptr()
        return base <= t.data_ptr() < base + self.size

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:  # a tensor view is still alive; the mapping goes with it
            pass

    def unlink(self) -> None:
        if not self.name:  # anonymous
            return
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass


def message_size(header: dict, tensors: Sequence[torch.Tensor]) -> int:
    return pack_header(header, tensors)[2]


def write_message(buf: torch.Tensor, header: dict, tensors: Sequence[torch.Tensor]) -> int:
    """[int64 header length][JSON header][aligned tensor data...] into a uint8 buffer; returns
    the activation bytes written. Each tensor is copied exactly once, from the producer's memory."""
    raw, offs, _ = pack_header(header, tensors)
    buf[:8 + len(raw)].copy_(torch.frombuffer(bytearray(struct.pack("<q", len(raw)) + raw), dtype=torch.uint8))
    nbytes = 0
    for t, off in zip(tensors, offs):
        n = t.numel() * t.element_size()
        buf[off:off + n].view(t.dtype).view(t.shape).copy_(t)
        nbytes += n
    return nbytes


def read_message(buf: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    """Header and tensors that are views of `buf` (zero copy)."""
    (hlen,) = struct.unpack("<q", buf[:8].numpy().tobytes())
    header = json.loads(buf[8:8 + hlen].numpy().tobytes())
    data0 = _align(8 + hlen)
    tensors = []
    for dtype, shape, off in header.pop("_t"):
        dt = DTYPES[dtype]
        n = dt.itemsize * _numel(shape)
        tensors.append(buf[data0 + off:data0 + off + n].view(dt).view(shape))
    return header, tensors


def pack_header(header: dict, tensors: Sequence[torch.Tensor], start: int = 0) -> tuple[bytes, list[int], int]:
    """JSON header with the tensor table; returns (bytes, data offsets, total bytes)."""
    table, off = [], 0
    for t in tensors:
        table.append([DTYPE_NAMES[t.dtype], list(t.shape), off])
        off = _align(off + t.numel() * t.element_size())
    raw = HEADER_JSON.encode({**header, "_t": table}).encode()
    data0 = _align(start + 8 + len(raw))
    return raw, [data0 + e[2] for e in table], data0 + off


# Ring slot layout: [int64 table bytes][int64 JSON bytes][tensor table][JSON header][aligned data].
# The table is int64 words (dtype code, ndim, shape..., data offset) per tensor: a visit's
# activations repeat the same table step after step, so both sides look it up as raw bytes
# instead of building and parsing JSON; a JSON header is written only when there is one
# (commands, metadata, sampled tokens), never for activations.
_PREFIX = struct.Struct("<qq")
_CODES = {dt: i for i, dt in enumerate(DTYPES.values())}
_BY_CODE = list(DTYPES.values())


def _encode_table(tensors: Sequence[torch.Tensor]) -> tuple[bytes, list[int], int]:
    words, offs, off = [], [], 0
    for t in tensors:
        words += [_CODES[t.dtype], t.dim(), *t.shape, off]
        offs.append(off)
        off = _align(off + t.numel() * t.element_size())
    return struct.pack(f"<{len(words)}q", *words), offs, off


def _decode_table(raw: bytes) -> list[tuple[torch.dtype, tuple[int, ...], int]]:
    words = struct.unpack(f"<{len(raw) // 8}q", raw)
    out, i = [], 0
    while i < len(words):
        nd = words[i + 1]
        out.append((_BY_CODE[words[i]], tuple(words[i + 2:i + 2 + nd]), words[i + 2 + nd]))
        i += 3 + nd
    return out


class ShmRing:
    """One directed channel: `slots` slots of `slot_bytes` each. One process sends, one receives."""

    def __init__(self, name: str, slots: int, slot_bytes: int, full, free, create: bool):
        self.name, self.slots, self.slot_bytes = name, slots, _align(slot_bytes)
        self.full, self.free = full, free            # semaphores: filled slots, free slots
        self.seg = ShmSegment(name, self.slots * self.slot_bytes, create)
        self.mm = self.seg.mm
        self.head = 0                                # next slot to write (sender side)
        self.tail = 0                                # next slot to read (receiver side)
        self.held: deque[int] = deque()              # slots received and not yet released
        self.bytes_sent = 0                          # activation bytes written (each exactly once)
        self.messages_sent = 0
        self._send_cache: dict = {}
        self._recv_cache: dict = {}
        self._tables: dict = {}

    @staticmethod
    def spec(slots: int, slot_bytes: int, ctx) -> dict:
        """What the engine creates per channel before spawning workers."""
        return {"name": new_name("ring"), "slots": slots, "slot_bytes": slot_bytes,
                "full": ctx.Semaphore(0), "free": ctx.Semaphore(slots)}

    @classmethod
    def open(cls, s: dict, create: bool) -> "ShmRing":
        return cls(s["name"], s["slots"], s["slot_bytes"], s["full"], s["free"], create)

    @staticmethod
    def _wait(sem, poll: Poll | None) -> None:
        # A ready message costs no timed wait; the timed loop only serves to notice a dead peer.
        # No spinning before blocking: on 2 cores a spinning stage takes the core from the other
        # stage or the engine (measured: 200 us of spin tripled the per-visit overhead).
        if sem.acquire(False):
            return
        while not sem.acquire(timeout=POLL_S):
            if poll is not None:
                poll()

    def send(self, header: dict, tensors: Sequence[torch.Tensor], poll: Poll | None = None) -> int:
        self._wait(self.free, poll)
        base = self.head * self.slot_bytes
        # Layouts repeat step after step (same shapes): cache the encoded table, the slot prefix
        # and the slot views by shapes, since building tensor views costs more than copying a
        # decode step's rows.
        skey = tuple([(t.dtype, t.shape) for t in tensors])
        tab = self._tables.get(skey)
        if tab is None:
            table, offs, data_bytes = _encode_table(tensors)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            tab = self._tables[skey] = (table, offs, data_bytes, _PREFIX.pack(len(table), 0) + table, nbytes)
            self._trim(self._tables)
        table, offs, data_bytes, prefix, nbytes = tab
        if header:
            raw = HEADER_JSON.encode(header).encode()
            prefix = _PREFIX.pack(len(table), len(raw)) + table + raw
        data0 = _align(len(prefix))
        if data0 + data_bytes > self.slot_bytes:
            self.free.release()
            raise ValueError(f"message of {data0 + data_bytes} bytes does not fit a {self.slot_bytes}-byte slot "
                             f"of {self.name}")
        vkey = (base + data0, skey)
        views = self._send_cache.get(vkey)
        if views is None:
            views = self._send_cache[vkey] = [self._view(base + data0 + off, t.dtype, tuple(t.shape))
                                              for t, off in zip(tensors, offs)]
            self._trim(self._send_cache)
        self.mm[base:base + len(prefix)] = prefix
        for t, dst in zip(tensors, views):
            dst.copy_(t)  # the one write of the activation, from the producer's tensor into the slot
        self.head = (self.head + 1) % self.slots
        self.bytes_sent += nbytes
        self.messages_sent += 1
        self.full.release()
        return nbytes

    def recv(self, poll: Poll | None = None) -> tuple[dict, list[torch.Tensor]]:
        self._wait(self.full, poll)
        base = self.tail * self.slot_bytes
        self.held.append(self.tail)
        self.tail = (self.tail + 1) % self.slots
        tlen, jlen = _PREFIX.unpack_from(self.mm, base)
        t0 = base + 16
        header = json.loads(self.mm[t0 + tlen:t0 + tlen + jlen]) if jlen else {}
        vkey = (base + _align(16 + tlen + jlen), self.mm[t0:t0 + tlen])
        views = self._recv_cache.get(vkey)
        if views is None:
            views = self._recv_cache[vkey] = [self._view(vkey[0] + off, dt, shape)
                                              for dt, shape, off in _decode_table(vkey[1])]
            self._trim(self._recv_cache)
        return header, list(views)  # views of the slot: the receiver computes on them in place

    def _view(self, off: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        n = dtype.itemsize * _numel(shape)
        return self.seg.buf[off:off + n].view(dtype).view(shape)

    @staticmethod
    def _trim(cache: dict) -> None:
        if len(cache) > 4096:
            cache.clear()

    def release(self) -> None:
        """The oldest received message is no longer used: its slot may be overwritten."""
        self.held.popleft()
        self.free.release()

    def close(self) -> None:
        self._send_cache.clear()
        self._recv_cache.clear()
        self._tables.clear()
        self.mm = None
        self.seg.close()

    def unlink(self) -> None:
        self.seg.unlink()


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
