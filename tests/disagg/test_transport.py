"""The shm ring in one process: zero copy (views of the slot), one write per activation, FIFO,
wrap-around; stale segments of dead engines are swept."""
from __future__ import annotations

import os

import torch
import torch.multiprocessing as tmp

from opdisagg_rt.disagg.transport.shm import PREFIX, SHM_DIR, ShmRing, sweep_stale


def test_ring_is_zero_copy_and_fifo():
    spec = ShmRing.spec(2, 1 << 16, tmp.get_context("spawn"))
    tx, rx = ShmRing.open(spec, create=True), ShmRing.open(spec, create=False)
    try:
        q = torch.randn(5, 8)
        for step in range(5):  # wraps around the 2 slots
            x = q + step
            n = tx.send({"step": step}, [x, x[:, :3].bfloat16()])  # non-contiguous source is fine
            h, (a, b) = rx.recv()
            assert h == {"step": step} and torch.equal(a, x) and torch.equal(b, x[:, :3].bfloat16())
            assert n == a.numel() * 4 + b.numel() * 2  # each activation written once
            assert rx.seg.contains(a) and rx.seg.contains(b)  # the receiver computes on the slot itself
            tx.seg.buf[a.data_ptr() - rx.seg.buf.data_ptr()].fill_(0)  # same memory seen by both sides
            a.add_(1)
            rx.release()
        assert tx.bytes_sent == 5 * n and tx.messages_sent == 5
    finally:
        tx.unlink()
    assert not os.path.exists(os.path.join(SHM_DIR, spec["name"]))


def test_sweep_removes_segments_of_dead_engines():
    pid = 2**22 + 1  # above the largest possible pid_max: never alive
    path = os.path.join(SHM_DIR, f"{PREFIX}{pid}-deadbeef-ring")
    open(path, "wb").close()
    assert f"{PREFIX}{pid}-deadbeef-ring" in sweep_stale()
    assert not os.path.exists(path)


def test_activation_messages_carry_a_binary_table_and_no_json():
    """Per-visit messages (empty header) cost no JSON on either side: the slot's JSON length word
    is 0 and the tensor table is read back from its raw bytes (every dtype, 0-d to 4-d, empty)."""
    import struct
    spec = ShmRing.spec(2, 1 << 16, tmp.get_context("spawn"))
    tx, rx = ShmRing.open(spec, create=True), ShmRing.open(spec, create=False)
    try:
        ts = [torch.randn(3, 4), torch.arange(6).view(1, 2, 3), torch.tensor(7, dtype=torch.int32),
              torch.ones(2, 1, 2, 2, dtype=torch.bfloat16), torch.zeros(0, 5), torch.tensor([True, False])]
        for step in range(3):  # the second and third use the cached table and views
            base = tx.head * tx.slot_bytes
            tx.send({}, ts)
            tlen, jlen = struct.unpack_from("<qq", tx.seg.mm, base)
            assert jlen == 0 and tlen == 8 * sum(3 + t.dim() for t in ts)
            h, got = rx.recv()
            assert h == {} and len(got) == len(ts)
            for a, b in zip(got, ts):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            rx.release()
        tx.send({"kind": "step", "n": 2}, ts[:1])  # a header still travels as JSON, with the same table
        h, (a,) = rx.recv()
        assert h == {"kind": "step", "n": 2} and torch.equal(a, ts[0])
        rx.release()
    finally:
        tx.unlink()
