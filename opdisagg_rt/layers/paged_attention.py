"""Attention over the paged KV cache for `layers.{i}.attn`: the one place that picks the
implementation for the tensors' device, so the layers carry no device checks.

- CPU (the default): torch ops and the C++ extension. Decode rows (one query each) go to the C++
  paged-attention kernel, which reads the blocks in place (only the window's keys when there is
  a window); each prefill runs torch's SDPA (blocked matmuls win for many query rows), straight
  on the new K/V when nothing is cached before it (consecutive fresh prompts of one length in
  one batched call), else over the blocks it can see (from the window's first block on, so blocks
  that fell out of a sliding window may be unmapped).
  Attention sinks (one float32 logit per head in each softmax denominator) scale a prefill's
  SDPA output by sigmoid(logsumexp - sink), with the log-sum-exp returned by torch's CPU flash
  kernel.
- CUDA: the Triton kernels of ``opdisagg_rt.kernels`` (paged decode; varlen prefill over the
  paged cache with its cached prefix; window and sinks; ``reshape_and_cache``). flash-attn
  (``flash_attn_with_kvcache`` for decodes, ``flash_attn_varlen_func`` for prefills, both with
  ``window_size``) takes the attention instead when it is installed and can serve the call:
  16-bit inputs, no sinks (it has no denominator logit), and a block size that is a multiple
  of 256 (upstream flash-attn's paged-KV requirement). Without triton, or with
  ``OPDISAGG_RT_DISABLE_TRITON=1``, CUDA tensors take the torch path (the extension's CUDA
  twins).

``OPDISAGG_RT_TRITON_ON_CPU=1`` together with ``TRITON_INTERPRET=1`` (set before the kernel
modules are first imported) sends CPU tensors down the Triton path, run by triton's
interpreter: very slow, for the tests of this dispatch only. It is read when this module is
imported (the CPU check runs twice per layer per step: an environment lookup there costs as
much as the cache write); :func:`refresh_switches` re-reads it.
"""
from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F

from opdisagg_rt import ops
from opdisagg_rt.kernels import backend
from opdisagg_rt.step_batch import StepBatch

__all__ = ["AttentionBackend", "attention_backend", "cache_backend", "paged_attention",
           "refresh_switches", "reshape_and_cache"]

AttentionBackend = Literal["torch", "triton", "flash_attn"]

TRITON_ON_CPU_ENV = "OPDISAGG_RT_TRITON_ON_CPU"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_PAGE = 256  # upstream flash-attn: paged KV block size must be a multiple of this


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


_TRITON_ON_CPU = _env_true(TRITON_ON_CPU_ENV)


def refresh_switches() -> None:
    """Re-read ``OPDISAGG_RT_TRITON_ON_CPU`` (for code that changes it after import)."""
    global _TRITON_ON_CPU
    _TRITON_ON_CPU = _env_true(TRITON_ON_CPU_ENV)


def cache_backend(device: torch.device | str) -> Literal["torch", "triton"]:
    """Which implementation writes the KV cache on ``device``."""
    dev = torch.device(device)
    if dev.type == "cpu" and not _TRITON_ON_CPU:
        return "torch"
    return "triton" if backend.use_triton(dev, allow_interpreter=True) else "torch"


def attention_backend(device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16,
                      block_size: int = 16, sinks: bool = False) -> AttentionBackend:
    """Which implementation runs paged attention on ``device`` for this call's properties
    (flash-attn only serves 16-bit inputs without sinks over blocks of a multiple of 256).
    ``OPDISAGG_RT_DISABLE_TRITON=1`` turns flash-attn off too: the torch path everywhere."""
    dev = torch.device(device)
    if dev.type == "cpu" and not _TRITON_ON_CPU:
        return "torch"
    if _env_true("OPDISAGG_RT_DISABLE_TRITON"):
        return "torch"
    if (dev.type == "cuda" and torch.cuda.is_available() and dtype in _FLASH_DTYPES
            and not sinks and block_size % _FLASH_PAGE == 0 and backend.flash_attn_available()):
        return "flash_attn"
    return "triton" if backend.use_triton(dev, allow_interpreter=True) else "torch"


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's ``key``/``value`` ``[T, KVH, D]`` into the paged caches at
    ``slot_mapping`` (slot -1 skipped), with the device's implementation."""
    if key.is_cpu and not _TRITON_ON_CPU:  # the fast path: no device object, no env lookup
        ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    elif cache_backend(key.device) == "triton":
        from opdisagg_rt import kernels

        kernels.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
                    scale: float, window: int | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's rows, already written to the cache);
    caches: [num_blocks, block_size, KVH, D]; sinks: float32 [H] or None. Returns [T, H, D].
    Query row ``j`` of request ``r`` sits at ``seq_lens[r] - n_r + j`` and sees keys
    ``(p - window, p]`` (``[0, p]`` without a window)."""
    if q.is_cpu and not _TRITON_ON_CPU:
        return _torch_paged_attention(q, k, v, k_cache, v_cache, batch, scale, window, sinks)
    which = attention_backend(q.device, dtype=q.dtype, block_size=k_cache.shape[1],
                              sinks=sinks is not None)
    if which == "flash_attn":
        return _flash_paged_attention(q, k_cache, v_cache, batch, scale, window)
    if which == "triton":
        return _triton_paged_attention(q, k_cache, v_cache, batch, scale, window, sinks)
    return _torch_paged_attention(q, k, v, k_cache, v_cache, batch, scale, window, sinks)


def _triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            batch: StepBatch, scale: float, window: int | None,
                            sinks: torch.Tensor | None) -> torch.Tensor:
    """Decode rows through the split-K decode kernel, the rest through the varlen prefill
    kernel, both reading K/V through the block tables (the new rows are already cached)."""
    from opdisagg_rt import kernels

    out = torch.empty_like(q)
    nd, nr = batch.num_decodes, batch.num_reqs
    if nd:
        kernels.paged_decode_attention(q[:nd], k_cache, v_cache, batch.block_tables[:nd],
                                       batch.seq_lens[:nd], scale, window, sinks, out=out[:nd])
    if nr > nd:
        # query_start_loc keeps absolute row offsets: the kernel indexes q and out with them
        kernels.paged_prefill_attention(
            q, k_cache, v_cache, batch.block_tables[nd:], batch.query_start_loc[nd:],
            batch.seq_lens[nd:], scale, window, sinks, out=out,
            max_query_len=max(batch.query_lens_list[nd:]))
    return out


def _flash_window(window: int | None) -> tuple[int, int]:
    # flash-attn's (left, right): query p sees keys [p - left, p + right]; ours are (p - window, p]
    return (window - 1, 0) if window else (-1, -1)


def _flash_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           batch: StepBatch, scale: float, window: int | None) -> torch.Tensor:
    """flash-attn over the paged cache: decodes as a batch of one-token queries
    (``flash_attn_with_kvcache``), prefills as one varlen call whose keys are the whole
    context through the block table (causal masks align to the context's end)."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    out = torch.empty_like(q)
    nd, nr = batch.num_decodes, batch.num_reqs
    win = _flash_window(window)
    tables = batch.cached("flash_tables", lambda: batch.block_tables.to(torch.int32))
    lens = batch.cached("flash_seq_lens", lambda: batch.seq_lens.to(torch.int32))
    if nd:
        o = flash_attn_with_kvcache(q[:nd].unsqueeze(1), k_cache, v_cache, cache_seqlens=lens[:nd],
                                    block_table=tables[:nd], softmax_scale=scale, causal=True,
                                    window_size=win)
        out[:nd] = o.squeeze(1)
    if nr > nd:
        qsl = batch.query_start_loc
        s = nd  # decodes come first, one row each
        cu_q, cu_k = batch.cached("flash_cu", lambda: (
            (qsl[nd:] - qsl[nd]).to(torch.int32),
            F.pad(lens[nd:].cumsum(0, dtype=torch.int32), (1, 0))))
        out[s:] = flash_attn_varlen_func(
            q[s:], k_cache, v_cache, cu_q, cu_k, max(batch.query_lens_list[nd:]),
            max(batch.seq_lens_list[nd:]), softmax_scale=scale, causal=True, window_size=win,
            block_table=tables[nd:])
    return out


def _prefill_mask(q_pos: torch.Tensor, ctx: int, window: int | None, k_lo: int = 0) -> torch.Tensor:
    key_pos = torch.arange(k_lo, ctx)
    mask = key_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > q_pos[:, None] - window
    return mask


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """q [1, H, n, D], k/v [1, KVH, L, D] -> [1, H, n, D] with a sink logit per head: the softmax
    over [scores, sink] is softmax(scores) * sum / (sum + e^sink) = out * sigmoid(lse - sink)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the flash kernel has no GQA: expand K/V (a prefill-only copy)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    float_mask = None
    if mask is not None:
        float_mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = _flash_cpu(q, k, v, 0.0, causal, attn_mask=float_mask, scale=scale)
    keep = torch.sigmoid(lse - sinks.view(1, -1, 1))  # [1, H, n] float32
    return (out.float() * keep.unsqueeze(-1)).to(q.dtype)


def _torch_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
                           scale: float, window: int | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU path (torch and the C++ kernel); arguments as :func:`paged_attention`."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    bs = batch.block_size
    nd = batch.num_decodes
    if nd:
        # Decodes: the C++ kernel reads K/V straight from the paged cache (no gather).
        qsl, lens, tables = batch.cached("decode_meta", lambda: (
            batch.query_start_loc[: nd + 1], batch.seq_lens[:nd], batch.block_tables[:nd]))
        ops.paged_attention(out, q, k_cache, v_cache, tables, qsl, lens, scale, window or 0, sinks)
    starts = batch.query_start_loc.tolist() if batch.num_reqs > nd else ()
    lens, ctxs = batch.query_lens_list, batch.seq_lens_list
    r = nd
    while r < batch.num_reqs:
        s, e, ctx = starts[r], starts[r + 1], ctxs[r]
        n = e - s
        if ctx == n and (window is None or window >= n):
            # Fresh prompts of one length (a burst of new requests) share one batched SDPA call:
            # per-call overhead, not FLOPs, dominates short prompts.
            r_end = r + 1
            while r_end < batch.num_reqs and lens[r_end] == n and ctxs[r_end] == n:
                r_end += 1
            e = s + (r_end - r) * n
            qr, kr, vr = (x[s:e].unflatten(0, (r_end - r, n)).transpose(1, 2) for x in (q, k, v))
            mask, causal = None, True
        else:
            r_end = r + 1
            # keys before the first query's window are never read: start at the window's block
            first = 0 if window is None else max(0, ctx - n - window + 1) // bs
            ids = batch.block_tables[r, first: -(-ctx // bs)]
            k_lo = first * bs
            kr = k_cache.index_select(0, ids).view(-1, kv_heads, head_dim)[:ctx - k_lo]
            vr = v_cache.index_select(0, ids).view(-1, kv_heads, head_dim)[:ctx - k_lo]
            qr, kr, vr = (x.transpose(0, 1).unsqueeze(0) for x in (q[s:e], kr, vr))
            mask, causal = _prefill_mask(batch.positions[s:e], ctx, window, k_lo), False
        if sinks is not None:
            o = _sdpa_with_sinks(qr, kr, vr, mask, causal, scale, sinks)
        else:
            o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, is_causal=causal, scale=scale,
                                               enable_gqa=True)
        out[s:e] = o.transpose(1, 2).flatten(0, 1)
        r = r_end
    return out
