"""Transports move one message = (small JSON header, tensors) along one directed channel.

Every endpoint has `send(header, tensors, poll)`, `recv(poll) -> (header, tensors)` and
`release()` (the receiver is done with the oldest message it received). `poll` is called while
waiting, so the caller can notice a dead peer or a deadline and raise.
"""
from __future__ import annotations

import json

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# A header's wire form; one encoder (json.dumps(separators=...) builds one per call).
HEADER_JSON = json.JSONEncoder(separators=(",", ":"))


class PeerGone(RuntimeError):
    """The other end of a channel stopped (died, hung or was shut down)."""
