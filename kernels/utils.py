"""Input validation and small helpers shared by the Triton wrappers.

Every wrapper checks shapes, dtypes and devices of its inputs and raises ``ValueError`` (or
``TypeError`` for a wrong type) naming the argument. Checks of tensor *contents* (for example
"``seq_lens[r]`` is at least the number of query rows") need the values on the host: they run
when the tensors are on the CPU (the interpreter, the tests) and are skipped on CUDA, where they
would force a device synchronisation on every call.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for kernels that upcast their inputs to float32 after loading.

    float32 inputs: ``tf32x3`` (three TF32 products, float32-level accuracy on tensor cores;
    plain ``ieee`` fp32 dots are far slower). 16-bit inputs: ``tf32``, exact for the bf16/fp16
    operands and ~5e-4 relative on float32 intermediates (probabilities, states), well below
    the output's own rounding. The interpreter computes every dot in float32 regardless.
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_pow2(name: str, value: int, minimum: int = 16) -> None:
    """Tile sizes: a power of two, at least ``minimum`` (``tl.dot`` needs 16)."""
    check(isinstance(value, int) and value >= minimum and value & (value - 1) == 0,
          f"{name} must be a power of two >= {minimum}, got {value!r}")


def check_tensor(name: str, t: object, *, ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = None,
                 shape: Sequence[int | None] | None = None,
                 device: torch.device | None = None,
                 last_dim_contiguous: bool = True) -> torch.Tensor:
    """Check one tensor argument; ``shape`` entries that are None are not checked."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        check(t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape)),
              f"{name} must have shape {tuple('*' if s is None else s for s in shape)}, "
              f"got {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        check(t.dtype in dtypes,
              f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None:
        check(t.device == device,
              f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.numel() > 0:
        check(t.stride(-1) == 1, f"{name} must be dense in its last dimension (stride(-1) == 1), "
              f"got strides {t.stride()}")
    return t


def check_device(device: torch.device) -> None:
    """Triton runs on CUDA; on the CPU only under the interpreter (``TRITON_INTERPRET=1``)."""
    if device.type == "cuda":
        return
    from .backend import interpreter_enabled

    check(device.type == "cpu" and interpreter_enabled(),
          f"Triton kernels need CUDA tensors (got {device}); CPU tensors run only under "
          "TRITON_INTERPRET=1, set before the kernel modules are imported. On the CPU use the "
          "torch path (see opdisagg_rt.kernels.backend)")


def host_values(t: torch.Tensor) -> list[int] | None:
    """``t.tolist()`` when ``t`` is on the CPU (cheap), else None (content checks skipped)."""
    return t.tolist() if t.device.type == "cpu" else None


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> int:
    """Check a ``[N + 1]`` cumulative-length tensor; return N."""
    check_tensor(name, cu, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check(cu.numel() >= 1, f"{name} must have at least one entry (N + 1 for N sequences)")
    vals = host_values(cu)
    if vals is not None:
        check(all(b >= a for a, b in zip(vals, vals[1:])),
              f"{name} must be non-decreasing, got {vals}")
        check(vals[0] >= 0 and vals[-1] <= total,
              f"{name} must lie in [0, {total}] (the number of token rows), got {vals}")
    return cu.numel() - 1


def check_linear_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor | None) -> tuple[int, int, int, int, int, int]:
    """Token-flat linear-attention inputs: ``q``, ``k`` ``[T, HK, K]``, ``v`` ``[T, HV, V]``
    with ``HV`` a multiple of ``HK``. Returns (T, N, HK, K, HV, V); N = 1 when ``cu_seqlens``
    is None."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    check_device(device)
    total, hk, dk = q.shape
    check_tensor("k", k, shape=(total, hk, dk), dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check(v.shape[0] == total, f"v has {v.shape[0]} token rows, q has {total}")
    hv, dv = v.shape[1], v.shape[2]
    check(hk > 0 and hv % hk == 0, f"v heads ({hv}) must be a multiple of q/k heads ({hk})")
    n = check_cu_seqlens("cu_seqlens", cu_seqlens, total, device) if cu_seqlens is not None else 1
    return total, n, hk, dk, hv, dv


def check_state(name: str, state: torch.Tensor, shape: Sequence[int | None], device: torch.device,
                float32: bool = True) -> torch.Tensor:
    """A recurrent state ``[num_states, HV, K, V]``: float32 (when updated in place) and dense
    (``contiguous``), since the kernels index it with its natural strides."""
    check_tensor(name, state, shape=shape, dtypes=(torch.float32,) if float32 else FLOAT_DTYPES,
                 device=device)
    check(state.is_contiguous(), f"{name} must be contiguous")
    return state


def check_state_indices(state_indices: torch.Tensor | None, n: int, pool: int,
                        device: torch.device) -> None:
    """``state_indices`` ``[N]`` into a pool of ``pool`` states (negative: padding, skipped)."""
    if state_indices is None:
        check(pool >= n, f"state has {pool} entries but there are {n} sequences "
              "(pass state_indices to address a larger pool)")
        return
    check_tensor("state_indices", state_indices, shape=(n,), dtypes=INDEX_DTYPES, device=device)
    vals = host_values(state_indices)
    if vals:
        check(max(vals) < pool, f"state_indices {max(vals)} is beyond the state pool ({pool})")
        used = [x for x in vals if x >= 0]
        check(len(used) == len(set(used)), f"state_indices repeats a slot: {vals}")
