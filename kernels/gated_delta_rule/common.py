"""Argument checks shared by the gated delta rule wrappers."""
from __future__ import annotations

import torch

from ..utils import FLOAT_DTYPES, check_tensor


def check_gates(g: torch.Tensor, beta: torch.Tensor, total: int, hv: int,
                device: torch.device) -> None:
    """``g`` (log decay) and ``beta`` are ``[T, HV]``, one value per token and value head."""
    check_tensor("g", g, shape=(total, hv), dtypes=FLOAT_DTYPES, device=device)
    check_tensor("beta", beta, shape=(total, hv), dtypes=FLOAT_DTYPES, device=device)
