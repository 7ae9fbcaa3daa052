"""The Gated DeltaNet layer's Triton path (`opdisagg_rt/layers/gated_deltanet.py`: the chunked
kernel for prefill rows with per-slot initial/final states, the fused recurrent kernel updating
the state pool in place for decode rows) against the layer's torch path, run by triton's
interpreter on CPU tensors (TRITON_INTERPRET=1 from this folder's conftest).

One mixed step: three decode rows then prefills of 1, 17 and 70 tokens (across the 64-token
chunk edge), each request on its own slot of a pool with non-zero states and an unused slot that
must stay untouched. Tolerances: float32 2e-5 abs on outputs (|o| <= 0.33; measured 2e-7);
bfloat16 inputs 5e-3 abs on outputs (the kernels return bf16 outputs; measured 1.9e-3); float32
states 2e-5 abs in both cases (measured 1e-6).
"""
from __future__ import annotations

import pytest
import torch
from opdisagg_rt.kernels import backend

from opdisagg_rt.layers.gated_deltanet import gated_delta_rule

pytestmark = pytest.mark.skipif(not backend.use_triton("cpu", allow_interpreter=True),
                                reason="triton interpreter unavailable")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-3)])
def test_triton_path_matches_torch_path(dtype, tol):
    g = torch.Generator().manual_seed(0)
    hk, hv, dk, dv = 2, 4, 16, 16
    lengths = [1, 1, 1, 1, 17, 70]
    slots = torch.tensor([4, 0, 6, 2, 1, 5])  # slot 3 unused
    t = sum(lengths)
    q, k = torch.randn(t, hk, dk, generator=g).to(dtype), torch.randn(t, hk, dk, generator=g).to(dtype)
    v = torch.randn(t, hv, dv, generator=g).to(dtype)
    gate = -torch.rand(t, hv, generator=g)
    beta = torch.rand(t, hv, generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0)
    pool = torch.randn(7, hv, dk, dv, generator=g) * 0.3
    s_torch, s_triton = pool.clone(), pool.clone()
    want = gated_delta_rule(q, k, v, gate, beta, s_torch, slots, cu, 3, backend="torch")
    got = gated_delta_rule(q, k, v, gate, beta, s_triton, slots, cu, 3, backend="triton")
    assert want.abs().max() > 0.2
    assert (got - want).abs().max() < tol
    assert (s_triton - s_torch).abs().max() < 2e-5
    assert torch.equal(s_triton[3], pool[3])
