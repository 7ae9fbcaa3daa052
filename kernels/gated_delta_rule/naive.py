"""Naive torch references of the gated delta rule (Gated DeltaNet, Qwen3-Next).

Per value head, with ``q``/``k`` optionally L2-normalised (``x * rsqrt(sum(x^2) + 1e-6)``, as
transformers' ``l2norm``) and ``q`` multiplied by ``scale`` (default ``K ** -0.5``)::

    S_t = exp(g_t) S_{t-1}                       (S: [K, V], float32)
    S_t = S_t + k_t (beta_t (v_t - k_t^T S_t))^T    (the delta rule)
    o_t = q_t^T S_t

exactly as transformers' ``torch_recurrent_gated_delta_rule`` / ``torch_chunk_gated_delta_rule``
(``g`` is the log decay, ``<= 0``; ``beta`` the write strength). Grouped heads: value head ``h``
reads q/k head ``h // (HV // HK)``. Token-flat varlen layout: ``q``, ``k`` ``[T, HK, K]``,
``v`` ``[T, HV, V]``, ``g``, ``beta`` ``[T, HV]``, ``cu_seqlens`` ``[N + 1]`` (None: one
sequence); states ``[N, HV, K, V]``.
"""
from __future__ import annotations

import torch

__all__ = ["l2norm", "naive_recurrent_gated_delta_rule", "naive_chunk_gated_delta_rule"]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    hk, hv = q.shape[1], v.shape[1]
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q = q * scale
    if hv != hk:
        q = q.repeat_interleave(hv // hk, dim=1)
        k = k.repeat_interleave(hv // hk, dim=1)
    return q, k, v.float(), g.float(), beta.float()


def _bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, total)]
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def naive_recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     g: torch.Tensor, beta: torch.Tensor,
                                     scale: float | None = None,
                                     cu_seqlens: torch.Tensor | None = None,
                                     initial_state: torch.Tensor | None = None,
                                     output_final_state: bool = False,
                                     use_qk_l2norm: bool = False
                                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in float32. Returns (``o`` ``[T, HV, V]`` in ``v``'s dtype,
    final states ``[N, HV, K, V]`` float32 or None)."""
    total, hv, dv = v.shape
    dk = q.shape[-1]
    q, k, v32, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    bounds = _bounds(cu_seqlens, total)
    state = (torch.zeros(len(bounds), hv, dk, dv, device=v.device) if initial_state is None
             else initial_state.float().clone())
    o = torch.zeros(total, hv, dv, dtype=torch.float32, device=v.device)
    for n, (bos, eos) in enumerate(bounds):
        s = state[n]
        for t in range(bos, eos):
            s = s * g[t].exp()[:, None, None]
            kv_mem = torch.einsum("hk,hkv->hv", k[t], s)
            delta = (v32[t] - kv_mem) * beta[t][:, None]
            s = s + k[t][:, :, None] * delta[:, None, :]
            o[t] = torch.einsum("hk,hkv->hv", q[t], s)
        state[n] = s
    return o.to(v.dtype), (state if output_final_state else None)


def naive_chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 g: torch.Tensor, beta: torch.Tensor, scale: float | None = None,
                                 cu_seqlens: torch.Tensor | None = None,
                                 initial_state: torch.Tensor | None = None,
                                 output_final_state: bool = False, use_qk_l2norm: bool = False,
                                 chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked (WY / UT-transform) form, per sequence and chunk of ``L`` tokens, with
    ``G = cumsum(g)`` inside the chunk and ``Gam[i, j] = exp(G_i - G_j)`` for ``i >= j``::

        A = strict_lower((beta K) K^T * Gam);  T = (I + A)^-1
        W = T (beta K * exp(G));  U = T (beta V)
        V' = U - W S
        O = (Q * exp(G)) S + lower(Q K^T * Gam) V'
        S = exp(G_L) S + (K * exp(G_L - G))^T V'
    """
    total, hv, dv = v.shape
    dk = q.shape[-1]
    q, k, v32, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    bounds = _bounds(cu_seqlens, total)
    state = (torch.zeros(len(bounds), hv, dk, dv, device=v.device) if initial_state is None
             else initial_state.float().clone())
    o = torch.zeros(total, hv, dv, dtype=torch.float32, device=v.device)
    for n, (bos, eos) in enumerate(bounds):
        s = state[n]  # [HV, K, V]
        for c0 in range(bos, eos, chunk_size):
            c1 = min(c0 + chunk_size, eos)
            length = c1 - c0
            qc, kc = q[c0:c1].transpose(0, 1), k[c0:c1].transpose(0, 1)  # [HV, L, K]
            vc = v32[c0:c1].transpose(0, 1)  # [HV, L, V]
            bc = beta[c0:c1].transpose(0, 1)[..., None]  # [HV, L, 1]
            gc = g[c0:c1].transpose(0, 1).cumsum(-1)  # [HV, L]
            lower = torch.ones(length, length, dtype=torch.bool, device=v.device).tril()
            gam = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()
            a = ((bc * kc) @ kc.transpose(-1, -2) * gam).tril(-1)  # strictly lower
            eye = torch.eye(length, device=v.device).expand_as(a)
            t_inv = torch.linalg.solve_triangular(eye + a, eye, upper=False, unitriangular=True)
            w = t_inv @ (bc * kc * gc.exp()[..., None])
            u = t_inv @ (bc * vc)
            v_new = u - w @ s
            attn = (qc @ kc.transpose(-1, -2)) * gam
            o[c0:c1] = ((qc * gc.exp()[..., None]) @ s + attn @ v_new).transpose(0, 1)
            g_last = gc[..., -1:]
            k_decayed = kc * (g_last - gc).exp()[..., None]
            s = g_last.exp()[..., None] * s + k_decayed.transpose(-1, -2) @ v_new
        state[n] = s
    return o.to(v.dtype), (state if output_final_state else None)
