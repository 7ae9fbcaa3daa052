"""Dense projection with the fastest CPU kernel available for the weight's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mkldnn_packing_works(weight: torch.Tensor) -> bool:
    try:
        x = torch.zeros(2, weight.shape[1], dtype=weight.dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")
        return True
    except (RuntimeError, AttributeError):
        return False


class Linear:
    """y = x @ W^T (+ b). On CPUs with bf16 matrix units (AMX/AVX512-BF16) oneDNN is faster when
    the weight is reordered once into its blocked layout instead of on every call."""

    __slots__ = ("bias", "out_features", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.contiguous()
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = None
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _mkldnn_packing_works(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > 0:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        return F.linear(x, self.weight, self.bias)
