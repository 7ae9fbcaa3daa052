"""Which implementation runs an operation for a given tensor: the Triton kernels or torch.

The layers ask here once (per tensor device) instead of checking devices themselves:

    from opdisagg_rt.kernels import backend
    if backend.use_triton(q):          # CUDA tensor and triton importable
        out = kernels.paged_decode_attention(...)
    else:                              # CPU: torch / the C++ extension
        ...

``OPDISAGG_RT_DISABLE_TRITON=1`` forces the torch path everywhere (debugging, A/B checks).
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly, in numpy); that is for
tests only, so :func:`use_triton` says False for CPU tensors unless ``allow_interpreter=True``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

__all__ = ["triton_available", "flash_attn_available", "interpreter_enabled", "use_triton",
           "select", "Backend"]

Backend = Literal["triton", "torch"]

_TRUE = ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it may not on some platforms or CPU-only installs)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - broken install
        return False
    return True


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """True when flash-attn's ``flash_attn_varlen_func`` can be imported (CUDA installs only)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set (triton reads it when a kernel is decorated, i.e.
    when the kernel module is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _device(x: torch.Tensor | torch.device | str) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device(x)


def use_triton(x: torch.Tensor | torch.device | str, *, allow_interpreter: bool = False) -> bool:
    """Whether the Triton kernels can run on ``x``'s device.

    True for CUDA devices when torch sees CUDA and triton is importable (and
    ``OPDISAGG_RT_DISABLE_TRITON`` is not set). For CPU devices only when
    ``allow_interpreter`` and ``TRITON_INTERPRET=1`` (tests).
    """
    if os.environ.get("OPDISAGG_RT_DISABLE_TRITON", "0").strip().lower() in _TRUE:
        return False
    dev = _device(x)
    if dev.type == "cuda":
        return torch.cuda.is_available() and triton_available()
    if dev.type == "cpu":
        return allow_interpreter and interpreter_enabled() and triton_available()
    return False


def select(x: torch.Tensor | torch.device | str, *, allow_interpreter: bool = False) -> Backend:
    """``"triton"`` or ``"torch"`` for ``x``'s device (see :func:`use_triton`)."""
    return "triton" if use_triton(x, allow_interpreter=allow_interpreter) else "torch"
