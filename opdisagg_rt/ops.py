"""Ops of the C++ extension ``opdisagg_rt._C`` (paged-KV copies, paged attention, and the
row-wise ops between the GEMMs), and their torch references.

The ops are registered with the torch dispatcher as ``torch.ops.opdisagg.*`` (CPU always, CUDA
when built with a CUDA torch, Meta for torch.compile); the functions here are thin typed calls.
KV layout (DESIGN.md): per layer K and V caches ``[num_blocks, block_size, kv_heads, head_dim]``,
``slot = block * block_size + offset``, slot -1 skipped. Index tensors are int64 on the caches'
device. The ``*_ref`` functions are plain torch indexing, the ground truth in tests.
"""

from __future__ import annotations

import torch

try:
    from opdisagg_rt import _C  # noqa: F401  (loading it registers torch.ops.opdisagg.*)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "opdisagg_rt._C, the C++ extension, is missing or failed to load "
        f"({e}); build it with `pip install --no-build-isolation -e .` from the repo root"
    ) from e

# Bound once: calling an OpOverload directly skips the packet's overload resolution, which costs
# about as much as the copy itself on a decode step (called once per layer).
_ops = torch.ops.opdisagg
_reshape_and_cache = _ops.reshape_and_cache.default
_copy_blocks = _ops.copy_blocks.default
_gather_blocks = _ops.gather_blocks.default
_scatter_blocks = _ops.scatter_blocks.default
_paged_attention = _ops.paged_attention.default
_rms_norm = _ops.rms_norm.default
_silu_and_mul = _ops.silu_and_mul.default
_rotary_embedding = _ops.rotary_embedding.default
_linear_amx = _ops.linear_amx.default
_linear_amx_q4_1 = _ops.linear_amx_q4_1.default
_linear_amx_q8_0 = _ops.linear_amx_q8_0.default

__all__ = [
    "copy_blocks",
    "copy_blocks_ref",
    "gather_blocks",
    "gather_blocks_ref",
    "paged_attention",
    "paged_attention_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_embedding",
    "rotary_embedding_ref",
    "scatter_blocks",
    "scatter_blocks_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
]


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, kv_heads, head_dim]`` into the caches in place at
    ``slot_mapping[t]`` (int64 ``[num_tokens]``); tokens with slot -1 are skipped."""
    _reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    """For each row ``(src, dst)`` of ``block_mapping`` (int64 ``[n, 2]``), copy block ``src``
    to block ``dst`` in every cache (copy-on-write). Pairs must be independent: no ``dst`` is
    another pair's ``src``."""
    _copy_blocks(key_caches, value_caches, block_mapping)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Return the blocks ``cache[block_ids]`` as one new contiguous tensor
    ``[len(block_ids), *cache.shape[1:]]``."""
    return _gather_blocks(cache, block_ids)


def scatter_blocks(buffer: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Inverse of :func:`gather_blocks`: ``cache[block_ids] = buffer`` in place."""
    _scatter_blocks(buffer, cache, block_ids)



def paged_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    window: int = 0, sinks: torch.Tensor | None = None) -> None:
    """Attention of ``query`` ``[T, H, D]`` over the paged caches, written into ``out``
    ``[T, H, D]`` (same dtype: float32, bfloat16 or float16; float32 accumulation).

    Request ``r`` owns query rows ``query_start_loc[r]:query_start_loc[r+1]`` (``n_r`` of them,
    0 allowed); ``seq_lens[r]`` is its context length including those new tokens, whose K/V
    must already be in the caches. Its ``j``-th row sits at position ``p = seq_lens[r] - n_r + j``
    and attends key positions ``[0, p]``, or ``[max(0, p - window + 1), p]`` when ``window > 0``;
    key ``k`` is read at slot ``block_tables[r, k // block_size] * block_size + k % block_size``.
    GQA: query head ``h`` uses kv head ``h // (H // kv_heads)``. ``sinks`` (float32 ``[H]``) adds
    a per-head logit to the softmax denominator only. Rows of ``out`` outside
    ``query_start_loc[0]:query_start_loc[-1]`` are left untouched. Index tensors are int64;
    ``query``/``out`` rows may be strided but each head vector must be dense.
    """
    _paged_attention(out, query, key_cache, value_cache, block_tables, query_start_loc,
                     seq_lens, scale, window, sinks)


def rms_norm(input: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * x / sqrt(mean(x**2, -1) + eps)`` in float32; for bf16/fp16 inputs the
    normalized value is rounded to the input dtype before the weight multiplies it (as
    transformers' LlamaRMSNorm). ``weight``: ``[hidden]``, the input's dtype."""
    out = torch.empty_like(input) if out is None else out
    _rms_norm(out, input, weight, eps)
    return out


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``input = [gate | up]`` ``[..., 2d]``; returns ``[..., d]``.
    silu's result is rounded to the input dtype before the product (transformers' order)."""
    if out is None:
        out = torch.empty(*input.shape[:-1], input.shape[-1] // 2, dtype=input.dtype, device=input.device)
    _silu_and_mul(out, input)
    return out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    """Rotate ``query`` ``[T, H, D]`` and ``key`` ``[T, KVH, D]`` in place: the first
    ``rotary_dim = cos_sin_cache.shape[1]`` dims of each head by row ``positions[t]`` (int64) of
    the float32 table ``[max_position, rotary_dim]`` = ``[cos | sin]``. ``is_neox`` pairs dims
    ``(i, i + rotary_dim/2)`` (Llama's rotate_half), else ``(2i, 2i+1)`` (GPT-J). Rows may be
    strided (views of a fused QKV output); each head vector must be dense."""
    _rotary_embedding(positions, query, key, cos_sin_cache, is_neox)


def amx_available() -> bool:
    """Whether :func:`linear_amx` runs here (AMX-BF16 CPU, OS permission, OPDISAGG_AMX != 0)."""
    return bool(_ops.amx_available())


def pack_weight_amx(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` bf16 weight -> ``[ceil(N/32), ceil(K/32), 2, 16, 32]``, zero padded: for each
    block of 32 output columns and step of 32 inputs, two AMX A tiles (16 columns x 32 inputs),
    2 KiB contiguous: element ``[nb, kb, t, i, j] = W[32nb + 16t + i, 32kb + j]``."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16:
        raise ValueError(f"pack_weight_amx: weight must be a 2-D bfloat16 [N, K] tensor, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    nb, kb = -(-n // 32), -(-k // 32)
    padded = torch.nn.functional.pad(weight, (0, kb * 32 - k, 0, nb * 32 - n))
    # [nb, t, i, kb, j] -> [nb, kb, t, i, j]
    return padded.view(nb, 2, 16, kb, 32).permute(0, 3, 1, 2, 4).contiguous()


def linear_amx(input: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``input [M, K] @ W.T (+ bias)`` in bf16 with ``W`` packed by :func:`pack_weight_amx`;
    float32 accumulation, one rounding. With ``residual`` (bf16 ``[M, N]``) returns ``residual +``
    that bf16 result, rounded as a bf16 add (the residual stream update of a decoder layer,
    without a separate add). Needs :func:`amx_available`."""
    if out is None:
        out = torch.empty(input.shape[0], out_features, dtype=input.dtype, device=input.device)
    _linear_amx(out, input, packed, bias, residual)
    return out


def pack_weight_amx_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 rows ``uint8 [N, K/32, 20]`` (per block: float16 d, float16 m, 16 bytes of
    nibbles, element j low / j + 16 high) -> ``uint8 [ceil(N/32), K/32, 640]`` for
    :func:`linear_amx_q4_1`. Per (32 columns, 32 inputs): for each column pair ``(2p, 2p + 1)``
    32 bytes, byte ``j`` = ``q[2p][j] | q[2p + 1][j] << 4`` (input j's quants of the two
    columns), then float16 ``d[32]`` and ``m[32]``. Padding columns are zero (d = m = 0)."""
    if blocks.dim() != 3 or blocks.dtype != torch.uint8 or blocks.shape[2] != 20:
        raise ValueError(f"pack_weight_amx_q4_1: blocks must be uint8 [N, K/32, 20] (GGUF Q4_1), got "
                         f"{blocks.dtype} {tuple(blocks.shape)}")
    n, kb = blocks.shape[:2]
    nb = -(-n // 32)
    blocks = torch.nn.functional.pad(blocks, (0, 0, 0, 0, 0, nb * 32 - n))
    steps = blocks.view(nb, 32, kb, 20).transpose(1, 2)  # [nb, kb, column, block]
    nibbles = steps[..., 4:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # [nb, kb, column, input]
    pairs = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(nb, kb, 512)
    scales = steps[..., :4].reshape(nb, kb, 32, 2, 2).transpose(2, 3).reshape(nb, kb, 128)  # d[32], m[32]
    return torch.cat([pairs, scales], dim=-1).contiguous()


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 rows ``uint8 [N, K/32, 20]`` -> float32 ``[N, K]`` (``d * q + m``)."""
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    qs = blocks[..., 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
    return (q * d + m).reshape(blocks.shape[0], -1)


def linear_amx_q4_1(input: torch.Tensor, packed: torch.Tensor, out_features: int,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_amx` with the weight kept as GGUF Q4_1 (packed by
    :func:`pack_weight_amx_q4_1`), expanded to bf16 tile by tile: the same bf16 weight values as
    ``dequantize_q4_1(blocks).bfloat16()``, at under a third of the memory traffic."""
    if out is None:
        out = torch.empty(input.shape[0], out_features, dtype=input.dtype, device=input.device)
    _linear_amx_q4_1(out, input, packed, bias, residual)
    return out


def pack_weight_amx_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 rows ``uint8 [N, K/32, 34]`` (per block: float16 d, 32 int8) -> ``uint8
    [ceil(N/32), K/32, 1088]`` for :func:`linear_amx_q8_0`: per (32 columns, 32 inputs) the
    32 int8 quants of each column's block (one AMX A-tile row each), then float16 ``d[32]``."""
    if blocks.dim() != 3 or blocks.dtype != torch.uint8 or blocks.shape[2] != 34:
        raise ValueError(f"pack_weight_amx_q8_0: blocks must be uint8 [N, K/32, 34] (GGUF Q8_0), got "
                         f"{blocks.dtype} {tuple(blocks.shape)}")
    n, kb = blocks.shape[:2]
    nb = -(-n // 32)
    blocks = torch.nn.functional.pad(blocks, (0, 0, 0, 0, 0, nb * 32 - n))
    steps = blocks.view(nb, 32, kb, 34).transpose(1, 2)  # [nb, kb, column, block]
    return torch.cat([steps[..., 2:].reshape(nb, kb, 1024), steps[..., :2].reshape(nb, kb, 64)], dim=-1).contiguous()


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 rows ``uint8 [N, K/32, 34]`` -> float32 ``[N, K]`` (``d * q``)."""
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(blocks.shape[0], -1)


def linear_amx_q8_0(input: torch.Tensor, packed: torch.Tensor, out_features: int,
                    bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_amx` with the weight kept as GGUF Q8_0 (see :func:`pack_weight_amx_q8_0`),
    expanded tile by tile to the bf16 values of ``dequantize_q8_0(blocks).bfloat16()``."""
    if out is None:
        out = torch.empty(input.shape[0], out_features, dtype=input.dtype, device=input.device)
    _linear_amx_q8_0(out, input, packed, bias, residual)
    return out

# ---- references: naive torch indexing ------------------------------------------------------

def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep]


def copy_blocks_ref(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                    block_mapping: torch.Tensor) -> None:
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for cache in [*key_caches, *value_caches]:
        cache[dst] = cache[src]


def gather_blocks_ref(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    return cache[block_ids].contiguous()


def scatter_blocks_ref(buffer: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    cache[block_ids] = buffer


def paged_attention_ref(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                        value_cache: torch.Tensor, block_tables: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                        window: int = 0, sinks: torch.Tensor | None = None) -> None:
    """Naive :func:`paged_attention`: per request, gather its keys, mask, softmax in float32."""
    block_size, kv_heads, dim = key_cache.shape[1:]
    group = query.shape[1] // kv_heads
    k_flat = key_cache.reshape(-1, kv_heads, dim)
    v_flat = value_cache.reshape(-1, kv_heads, dim)
    for r in range(block_tables.shape[0]):
        start, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
        n, ctx = end - start, int(seq_lens[r])
        if n == 0:
            continue
        k_lo = max(0, ctx - n - window + 1) if window > 0 else 0  # blocks below may be unmapped
        pos_k = torch.arange(k_lo, ctx)
        slots = block_tables[r, pos_k // block_size] * block_size + pos_k % block_size
        k = k_flat[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_flat[slots].float().repeat_interleave(group, dim=1)
        q = query[start:end].float()  # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
        pos_q = torch.arange(ctx - n, ctx)
        visible = pos_k[None, :] <= pos_q[:, None]
        if window > 0:
            visible &= pos_k[None, :] > pos_q[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.float()[:, None, None].expand(-1, n, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hnl,lhd->nhd", probs, v).to(out.dtype)


def rms_norm_ref(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = input.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(input.dtype)


def silu_and_mul_ref(input: torch.Tensor) -> torch.Tensor:
    gate, up = input.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_embedding_ref(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (query, key):
        part = x[..., :rot].float()
        x1, x2 = (part[..., : rot // 2], part[..., rot // 2:]) if is_neox else (part[..., 0::2], part[..., 1::2])
        r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        rotated = torch.cat([r1, r2], -1) if is_neox else torch.stack([r1, r2], -1).flatten(-2)
        x[..., :rot] = rotated.to(x.dtype)


# ---- linear-attention decode (csrc/cpu/linear_attention.cpp; CPU only) ----------------------

def linear_attention_decode_supported(q: torch.Tensor, state: torch.Tensor) -> bool:
    """Whether the decode ops below take these rows: CPU, float32/bf16/fp16 q and a contiguous
    float32 state (else the layers run their torch reference, gather-update-scatter)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and state.dtype == torch.float32 and state.is_contiguous())


def lightning_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                               state_indices: torch.Tensor, decay: torch.Tensor,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """One MiniMax Lightning decode token per row ``n``, in place on the state pool: with
    ``S = state[state_indices[n], h]`` (float32 ``[d_k, d_v]``), ``S = decay[h] * S + k^T v`` and
    ``out[n, h] = q S`` (no scale). q, k ``[N, H, d_k]``, v ``[N, H, d_v]`` (float32 / bf16 /
    fp16, rows may be strided), state float32 contiguous ``[slots, H, d_k, d_v]``,
    state_indices int64 ``[N]`` (distinct), decay float32 ``[H]`` = ``exp(-slope)``. ``out``
    (default: v's dtype) may be float32 or another 16-bit dtype; float32 math."""
    if out is None:
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    torch.ops.opdisagg.lightning_attention_decode.default(out, q, k, v, state, state_indices, decay)
    return out


def gated_delta_rule_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            beta: torch.Tensor, state: torch.Tensor, state_indices: torch.Tensor,
                            scale: float | None = None, use_qk_l2norm: bool = True,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """One gated-delta-rule decode token per row ``n`` (Qwen3-Next), in place on the state pool:
    q, k ``[N, HK, d_k]`` are L2-normalised (``x * rsqrt(sum(x^2) + 1e-6)``, if
    ``use_qk_l2norm``) and q times ``scale`` (default ``d_k ** -0.5``); value head ``h`` uses key
    head ``h // (H // HK)``. With ``S = state[state_indices[n], h]``: ``S = exp(g[n, h]) S``,
    ``S += k^T (beta[n, h] (v - k S))``, ``out[n, h] = q S``. v ``[N, H, d_v]``; g, beta float32
    ``[N, H]``; ``out`` defaults to float32."""
    if out is None:
        out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    torch.ops.opdisagg.gated_delta_rule_decode.default(out, q, k, v, g, beta, state, state_indices, scale,
                                                      use_qk_l2norm)
    return out


def lightning_attention_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                                   state_indices: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """Naive :func:`lightning_attention_decode`: gather, update, scatter; returns float32 out."""
    s = state[state_indices] * decay.view(-1, 1, 1) + k.float()[..., :, None] * v.float()[..., None, :]
    state[state_indices] = s
    return torch.einsum("nhk,nhkv->nhv", q.float(), s)


def gated_delta_rule_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                beta: torch.Tensor, state: torch.Tensor, state_indices: torch.Tensor,
                                scale: float | None = None, use_qk_l2norm: bool = True) -> torch.Tensor:
    """Naive :func:`gated_delta_rule_decode` (the recurrence as written); returns float32 out."""
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    r = v.shape[1] // q.shape[1]
    q, k = q.repeat_interleave(r, 1), k.repeat_interleave(r, 1)
    s = state[state_indices] * g.exp()[..., None, None]
    delta = (v.float() - torch.einsum("nhk,nhkv->nhv", k, s)) * beta[..., None]
    s = s + k[..., :, None] * delta[..., None, :]
    state[state_indices] = s
    return torch.einsum("nhk,nhkv->nhv", q, s)


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         state_indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode step of a causal depthwise conv1d (no activation), in place on the state pool:
    for row ``n`` with ``s = conv_state[state_indices[n]]`` (float32 ``[C, kernel - 1]``, the
    last inputs), ``out[n] = sum_j weight[:, j] * [s | x[n]][:, j]`` and ``s`` becomes
    ``[s[:, 1:] | x[n]]``. x ``[N, C]`` (rows may be strided); weight float32 ``[C, kernel]``;
    ``out`` defaults to float32."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.ops.opdisagg.causal_conv1d_update.default(out, x, conv_state, weight, state_indices)
    return out


def causal_conv1d_update_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             state_indices: torch.Tensor) -> torch.Tensor:
    win = torch.cat([conv_state[state_indices], x.float()[..., None]], -1)
    conv_state[state_indices] = win[..., 1:]
    return (win * weight).sum(-1)
