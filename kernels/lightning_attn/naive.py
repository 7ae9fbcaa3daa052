"""Naive torch references of MiniMax Lightning attention (decayed linear attention).

Per head ``h`` with slope ``s_h > 0`` (MiniMax: ``slope_rate``), for each token ``t``::

    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t        (S: [K, V], float32)
    o_t = (scale * q_t) S_t

exactly as ``transformers``' ``MiniMaxLightningAttention`` (its chunked prefill with
``query_decay``/``key_decay``/``diagonal_decay`` and its recurrent decode with
``ratio = exp(-slope_rate)``); MiniMax uses ``scale = 1`` and no normalisation inside the
attention (the RMSNorm and output gate come after). Token-flat varlen layout: ``q``, ``k``
``[T, H, K]``, ``v`` ``[T, H, V]``, sequences delimited by ``cu_seqlens`` ``[N + 1]`` (None: one
sequence); states ``[N, H, K, V]``.
"""
from __future__ import annotations

import torch

__all__ = ["naive_recurrent_lightning_attn", "naive_chunk_lightning_attn"]


def _bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, total)]
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _init(initial_state: torch.Tensor | None, n: int, h: int, dk: int, dv: int,
          device: torch.device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(n, h, dk, dv, dtype=torch.float32, device=device)
    return initial_state.float().clone()


def naive_recurrent_lightning_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   slope: torch.Tensor, scale: float = 1.0,
                                   cu_seqlens: torch.Tensor | None = None,
                                   initial_state: torch.Tensor | None = None,
                                   output_final_state: bool = False
                                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in float32. Returns (``o`` ``[T, H, V]`` in ``v``'s dtype,
    final states ``[N, H, K, V]`` float32 or None)."""
    total, h, dk = q.shape
    dv = v.shape[-1]
    bounds = _bounds(cu_seqlens, total)
    state = _init(initial_state, len(bounds), h, dk, dv, q.device)
    decay = torch.exp(-slope.float()).view(h, 1, 1)
    o = torch.zeros(total, h, dv, dtype=torch.float32, device=q.device)
    for n, (bos, eos) in enumerate(bounds):
        s = state[n]
        for t in range(bos, eos):
            s = decay * s + k[t].float()[:, :, None] * v[t].float()[:, None, :]
            o[t] = torch.einsum("hk,hkv->hv", q[t].float() * scale, s)
        state[n] = s
    return o.to(v.dtype), (state if output_final_state else None)


def naive_chunk_lightning_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               slope: torch.Tensor, scale: float = 1.0,
                               cu_seqlens: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None,
                               output_final_state: bool = False, chunk_size: int = 64
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked form (transformers' MiniMax prefill, plus an initial state): within a chunk
    ``(Q K^T * D) V`` with ``D[i, j] = exp(-s (i - j))`` for ``i >= j``, across chunks
    ``(Q * exp(-s (i + 1))) S`` and ``S <- exp(-s L) S + (K * exp(-s (L - 1 - j)))^T V``."""
    total, h, dk = q.shape
    dv = v.shape[-1]
    bounds = _bounds(cu_seqlens, total)
    state = _init(initial_state, len(bounds), h, dk, dv, q.device)
    s_h = slope.float().view(h, 1, 1).to(q.device)
    o = torch.zeros(total, h, dv, dtype=torch.float32, device=q.device)
    for n, (bos, eos) in enumerate(bounds):
        st = state[n]  # [H, K, V]
        for c0 in range(bos, eos, chunk_size):
            c1 = min(c0 + chunk_size, eos)
            length = c1 - c0
            qc = q[c0:c1].float().transpose(0, 1) * scale  # [H, L, K]
            kc = k[c0:c1].float().transpose(0, 1)
            vc = v[c0:c1].float().transpose(0, 1)  # [H, L, V]
            i = torch.arange(length, device=q.device, dtype=torch.float32)
            diff = i[:, None] - i[None, :]
            diag = torch.where(diff >= 0, torch.exp(-s_h * diff.clamp(min=0)), torch.zeros(()))
            intra = ((qc @ kc.transpose(-1, -2)) * diag) @ vc
            inter = (qc * torch.exp(-s_h * (i[:, None] + 1))) @ st
            o[c0:c1] = (intra + inter).transpose(0, 1)
            k_decay = torch.exp(-s_h * (length - 1 - i)[:, None])
            st = torch.exp(-s_h * length) * st + (kc * k_decay).transpose(-1, -2) @ vc
        state[n] = st
    return o.to(v.dtype), (state if output_final_state else None)
