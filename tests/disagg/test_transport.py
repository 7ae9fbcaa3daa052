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
