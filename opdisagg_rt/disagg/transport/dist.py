"""torch.distributed point-to-point transport, for stages on different hosts: gloo on the CPU,
NCCL between CUDA devices. Rendezvous is env:// (MASTER_ADDR, MASTER_PORT), so torchrun or any
launcher works; rank 0 is the engine, rank i+1 is stage i.

A message is two sends: its size, then one flat uint8 buffer in the same layout as a shm slot
(JSON header + aligned raw tensors); never pickle.
"""
from __future__ import annotations

import threading
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from opdisagg_rt.disagg.transport import PeerGone
from opdisagg_rt.disagg.transport.shm import message_size, read_message, write_message

Poll = Callable[[], None]


def init_dist(rank: int, world: int, device: str) -> None:
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(hours=1))


def destroy_dist() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DistEndpoint:
    """Both directions between this rank and `peer` (FIFO per direction)."""

    def __init__(self, peer: int, device: str = "cpu", blocking: bool = False, tag: int = 0):
        self.peer, self.device, self.blocking, self.tag = peer, device, blocking, tag
        self.bytes_sent = self.messages_sent = 0

    def _wait(self, work, poll: Poll | None) -> None:
        if poll is None or self.blocking:
            work.wait()  # a stage worker: if the engine goes away, gloo raises "connection closed"
            return
        # The engine must keep polling for dead or hung stages, but gloo's point-to-point work
        # neither reports completion before wait() nor survives a timed-out wait(): wait in a
        # helper thread and poll here. A stage killed on failure makes that wait raise and end.
        done, err = threading.Event(), []

        def run() -> None:
            try:
                work.wait()
            except Exception as e:  # noqa: BLE001
                err.append(e)
            finally:
                done.set()
        threading.Thread(target=run, daemon=True).start()
        while not done.wait(0.05):
            poll()
        if err:
            raise PeerGone(f"rank {self.peer}: {err[0]}")

    def send(self, header: dict, tensors: Sequence[torch.Tensor], poll: Poll | None = None) -> int:
        buf = torch.empty(message_size(header, tensors), dtype=torch.uint8)
        nbytes = write_message(buf, header, tensors)
        self._wait(dist.isend(torch.tensor([buf.numel()], dtype=torch.int64), self.peer, tag=self.tag), poll)
        self._wait(dist.isend(buf, self.peer, tag=self.tag), poll)
        self.bytes_sent += nbytes
        self.messages_sent += 1
        return nbytes

    def recv(self, poll: Poll | None = None) -> tuple[dict, list[torch.Tensor]]:
        size = torch.empty(1, dtype=torch.int64)
        self._wait(dist.irecv(size, self.peer, tag=self.tag), poll)
        buf = torch.empty(int(size[0]), dtype=torch.uint8)
        self._wait(dist.irecv(buf, self.peer, tag=self.tag), poll)
        return read_message(buf)

    def release(self) -> None:
        pass  # the buffer was this process's own allocation
