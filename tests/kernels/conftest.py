"""Kernel tests run the Triton kernels on CPU tensors under the interpreter.

triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, i.e. when a module
defining kernels is imported, not at launch. That covers our kernel modules and also triton's
own ``triton.language.standard`` helpers (``tl.zeros``, ``tl.sum``, ``tl.max``, ``tl.cumsum``,
``tl.cdiv``...), decorated when triton itself is first imported. pytest imports this conftest
before the test modules of this folder, but other folders' tests (or torch) may have imported
triton or ``opdisagg_rt.kernels`` earlier in the same session, decorated for the GPU. So this
conftest

1. sets ``TRITON_INTERPRET=1``;
2. drops already-imported ``opdisagg_rt.kernels`` modules from ``sys.modules``, so the test
   modules import fresh, interpreted kernels;
3. if triton was imported before (its standard helpers are GPU ``JITFunction`` objects), lets
   such a helper run interpreted when an interpreted kernel calls it (calling a ``JITFunction``
   directly is otherwise always an error, so nothing else changes).

The variable stays set for the rest of the session: it only changes how kernel modules imported
later are decorated, and nothing on the CPU path launches them.
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
for _name in list(sys.modules):
    if _name == "opdisagg_rt.kernels" or _name.startswith("opdisagg_rt.kernels."):
        del sys.modules[_name]


def _interpret_compiled_helpers() -> None:
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(std.zeros, InterpretedFunction) or getattr(JITFunction, "_opdisagg_interp", 0):
        return  # triton was imported under the interpreter (or this ran already)
    interpreted: dict[int, InterpretedFunction] = {}

    def call(self, *args, **kwargs):  # only reached from interpreted code (see the docstring)
        fn = interpreted.get(id(self))
        if fn is None:
            fn = interpreted[id(self)] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    JITFunction.__call__ = call
    JITFunction._opdisagg_interp = True


if "triton" in sys.modules:
    _interpret_compiled_helpers()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                  fp32_tol: float = 1e-5, low_tol: float = 2e-2) -> None:
    """allclose with the tolerance of the kernel inputs' dtype: ``fp32_tol`` (atol = rtol) for
    float32, ``low_tol`` for bfloat16/float16 (a couple of bf16 ulps, 2^-8 relative each; the
    reference sees the same rounded inputs, so only the output rounding and the order of the
    float32 sums differ)."""
    tol = fp32_tol if dtype == torch.float32 else low_tol
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


@pytest.fixture
def assert_close():
    return _assert_close


def runtime_ops():
    """``opdisagg_rt.ops`` (the C++ extension's references) for anchoring tests, or a skip when
    it cannot be imported in this checkout (extension not built, or stale against the sources)."""
    try:
        from opdisagg_rt import ops
    except Exception as e:  # ImportError, or a missing op in a stale build
        pytest.skip(f"opdisagg_rt.ops unavailable: {type(e).__name__}: {e}")
    return ops


@pytest.fixture
def ops_module():
    return runtime_ops()
