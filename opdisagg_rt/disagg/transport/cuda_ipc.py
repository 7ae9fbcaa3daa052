"""CUDA IPC path for stages on GPUs of one host (UNTESTED here: this machine has no CUDA).

Same design as the shm ring: the receiver allocates the ring's slots once on its GPU and
publishes their IPC handles (raw bytes in the JSON set-up message, no pickle); the sender opens
them once and then writes activations with one device-to-device copy per message, while the
small header and the doorbell go through a ShmRing. Import only where CUDA exists.
"""
from __future__ import annotations

import base64

import torch

if not torch.cuda.is_available():  # guarded: never imported on CPU-only hosts
    raise ImportError("opdisagg_rt.disagg.transport.cuda_ipc needs CUDA")


def export_slots(nbytes: int, slots: int, device: str) -> tuple[torch.Tensor, list[dict]]:
    """Receiver side: allocate the slots; return them and JSON-able IPC handles."""
    buf = torch.empty(slots * nbytes, dtype=torch.uint8, device=device)
    st = buf.untyped_storage()
    dev, handle, size, offset, *_ = st._share_cuda_()
    desc = {"device": dev, "handle": base64.b64encode(handle).decode(), "size": size, "offset": offset,
            "slot_bytes": nbytes, "slots": slots}
    return buf, [desc]


def open_slots(desc: dict) -> torch.Tensor:
    """Sender side: map the receiver's slots once (torch keeps the mapping cached)."""
    st = torch.UntypedStorage._new_shared_cuda(desc["device"], base64.b64decode(desc["handle"]), desc["size"],
                                               desc["offset"], None, None, None, None)
    return torch.empty(0, dtype=torch.uint8, device=f"cuda:{desc['device']}").set_(st)


def write_slot(slots: torch.Tensor, slot_bytes: int, index: int, tensors: list[torch.Tensor]) -> list[int]:
    """Copy each activation once into slot `index`; returns the byte offsets (for the header)."""
    base, offs = index * slot_bytes, []
    for t in tensors:
        n = t.numel() * t.element_size()
        slots[base:base + n].view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
        offs.append(base)
        base += (n + 255) // 256 * 256
    torch.cuda.current_stream().synchronize()  # the receiver reads after the doorbell
    return offs
