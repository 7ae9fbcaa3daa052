"""Dense projection with the fastest CPU kernel available for the weight's dtype and row count."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from opdisagg_rt import ops

# Up to this many rows a bf16 projection streams its weight through the AMX kernel
# (csrc/cpu/linear_amx.cpp); beyond it oneDNN's blocked GEMM wins (measured: see bench/README).
AMX_MAX_ROWS = int(os.environ.get("OPDISAGG_AMX_MAX_ROWS", "64"))


# GGUF block kind -> (packing, kernel, bytes per 32-weight block).
_GGUF_KERNELS = {"q4_1": (ops.pack_weight_amx_q4_1, ops.linear_amx_q4_1, 20),
                 "q8_0": (ops.pack_weight_amx_q8_0, ops.linear_amx_q8_0, 34)}


def _mkldnn_packing_works(weight: torch.Tensor) -> bool:
    try:
        x = torch.zeros(2, weight.shape[1], dtype=weight.dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")
        return True
    except (RuntimeError, AttributeError):
        return False


class Linear:
    """y = x @ W^T (+ b). On CPUs with bf16 matrix units the weight is prepacked once: for
    oneDNN's blocked GEMM (many rows: prefill) and, with AMX, for the row-streaming kernel
    (few rows: decode), instead of being reordered on every call."""

    __slots__ = ("amx", "amx_gguf", "bias", "out_features", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.contiguous()
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = self.amx = self.amx_gguf = None
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            if _mkldnn_packing_works(weight):
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)
            if AMX_MAX_ROWS > 0 and ops.amx_available() and (bias is None or bias.dtype == torch.bfloat16):
                self.amx = ops.pack_weight_amx(self.weight)

    def use_gguf(self, blocks: tuple[str, torch.Tensor] | None) -> None:
        """Stream the weight in its GGUF block form, ("q4_1" | "q8_0", uint8 [N, K/32, bytes]),
        whose bf16 dequantization is `self.weight`, in the AMX kernel: the same bf16 values at a
        third (Q4_1) or half (Q8_0) of the bytes. No-op without AMX or blocks."""
        if blocks is None or self.amx is None or self.weight.shape[1] % 32:
            return
        kind, raw = blocks
        pack, run, size = _GGUF_KERNELS[kind]
        if tuple(raw.shape) != (self.out_features, self.weight.shape[1] // 32, size):
            raise ValueError(f"{kind} blocks of shape {tuple(raw.shape)} do not match the weight "
                             f"{tuple(self.weight.shape)}")
        self.amx_gguf, self.amx = (run, pack(raw)), None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ b), plus `residual` when given (the decoder's residual-stream update, added
        by the AMX kernels as they store the rows instead of in a separate pass)."""
        rows = x.shape[0]
        if 0 < rows <= AMX_MAX_ROWS and x.dim() == 2:
            if self.amx_gguf is not None:
                run, packed = self.amx_gguf
                return run(x, packed, self.out_features, self.bias, residual=residual)
            if self.amx is not None:
                return ops.linear_amx(x, self.amx, self.out_features, self.bias, residual=residual)
        if self.packed is not None and rows > 0:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y
