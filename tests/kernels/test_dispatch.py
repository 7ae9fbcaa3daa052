"""The attention backend dispatch (opdisagg_rt/layers/paged_attention.py) through the real engine.

With ``OPDISAGG_RT_TRITON_ON_CPU=1`` (and ``TRITON_INTERPRET=1``, set by this folder's conftest)
CPU tensors take the Triton path: the paged decode and varlen prefill kernels and the Triton
``reshape_and_cache``, run by triton's interpreter. A tiny Llama and a tiny Mistral (sliding
window 8, blocks of 4) generate greedily in float32 from a batch of prompts of different lengths
(one past the window), with a chunked prefill (max_num_batched_tokens 16) and a later request
that hits the prefix cache; the tokens must equal the CPU path's (torch + C++ kernel) and every
step's logits must agree within 1e-4 absolute (float32, different summation order; observed
<= 8e-6). Weights use initializer_range 0.25 and the test checks each chosen token's top-1/top-2
margin (> 1e-3) so that equal tokens mean something.

On one mixed step (decodes, a prefill over a cached prefix, a fresh prefill): sinks and windows
through the dispatched Triton path equal the CPU path (1e-5 float32, 2e-2 bfloat16); and the
flash-attn glue (``_flash_paged_attention``: int32 metadata, ``window_size``, block tables,
decode/prefill split), run against a torch stand-in with flash-attn's documented semantics
(flash-attn needs CUDA), equals the CPU path within 1e-5.

The selection itself: CPU tensors pick torch by default; CUDA picks triton (flash-attn only for
16-bit inputs without sinks over blocks of a multiple of 256), checked with
``torch.cuda.is_available`` / ``triton_available`` patched, without running a kernel.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from opdisagg_rt.engine import Engine
from opdisagg_rt.layers import paged_attention as pa
from opdisagg_rt.sampling import SamplingParams
from tests.conftest import _tiny_tokenizer

transformers = pytest.importorskip("transformers")

BLOCK, WINDOW = 4, 8
LOGIT_ATOL = 1e-4
MIN_MARGIN = 1e-3


def _save(model, out: str) -> str:
    model.save_pretrained(out)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    return out


def _common(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "max_position_embeddings": 256, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-6, "initializer_range": 0.25}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("dispatch-llama"))
    cfg = transformers.LlamaConfig(**_common(_tiny_tokenizer(out)))
    torch.manual_seed(0)
    return _save(transformers.LlamaForCausalLM(cfg), out)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("dispatch-mistral"))
    cfg = transformers.MistralConfig(**_common(_tiny_tokenizer(out)), sliding_window=WINDOW)
    torch.manual_seed(1)
    return _save(transformers.MistralForCausalLM(cfg), out)


def _kernels():
    return importlib.import_module("opdisagg_rt.kernels")


@pytest.fixture
def switch(monkeypatch):
    """Set OPDISAGG_RT_TRITON_ON_CPU (read at import) and make the dispatch re-read it."""
    def set_(on: bool) -> None:
        monkeypatch.setenv(pa.TRITON_ON_CPU_ENV, "1" if on else "0")
        pa.refresh_switches()
    yield set_
    monkeypatch.undo()
    pa.refresh_switches()


def _run(path: str) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy tokens of a batch (prompts of 5, 13 and 30 tokens; the 30 is prefilled in two
    chunks) then of a prompt sharing 24 tokens with the 30 (a prefix-cache hit), plus every
    step's logits and the number of cached prompt tokens of the last request."""
    engine = Engine(path, dtype="float32", block_size=BLOCK, kv_cache_memory=2 << 20,
                    max_num_batched_tokens=16, num_threads=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 13, 30)]
    seen: list[torch.Tensor] = []
    run = engine.runner.execute
    engine.runner.execute = lambda batch: seen.append(run(batch).clone()) or seen[-1]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    hit = engine.generate([prompts[2][:24] + [7, 8, 9]], params, use_tqdm=False)[0]
    return [o.token_ids for o in outs] + [hit.token_ids], seen, hit.metrics.num_cached_tokens


@pytest.mark.parametrize("family", ["llama_dir", "mistral_dir"])
def test_triton_path_matches_cpu_path(family, request, monkeypatch, switch):
    path = request.getfixturevalue(family)
    switch(False)
    want, want_logits, cached = _run(path)
    assert cached >= 20  # the last request really hit the prefix cache
    for lg in want_logits:
        if lg.shape[0]:
            top2 = lg.topk(2, dim=-1).values
            assert float((top2[:, 0] - top2[:, 1]).min()) > MIN_MARGIN

    calls = {"decode": 0, "prefill": 0, "cache": 0}
    k = _kernels()
    for name, key in (("paged_decode_attention", "decode"), ("paged_prefill_attention", "prefill"),
                      ("reshape_and_cache", "cache")):
        fn = getattr(k, name)

        def spy(*a, _fn=fn, _key=key, **kw):
            calls[_key] += 1
            return _fn(*a, **kw)
        monkeypatch.setattr(k, name, spy)

    def no_torch(*a, **kw):
        raise AssertionError("the torch path ran with OPDISAGG_RT_TRITON_ON_CPU=1")
    monkeypatch.setattr(pa, "_torch_paged_attention", no_torch)
    monkeypatch.setattr(pa.ops, "reshape_and_cache", no_torch)
    switch(True)
    got, got_logits, _ = _run(path)
    assert min(calls.values()) > 0, calls
    assert got == want
    assert len(got_logits) == len(want_logits)
    for a, b in zip(got_logits, want_logits):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=LOGIT_ATOL, rtol=0), float((a - b).abs().max())


def test_cpu_picks_torch_by_default(monkeypatch, switch):
    switch(False)
    cpu = torch.zeros(1)
    assert pa.attention_backend(cpu.device) == "torch"
    assert pa.attention_backend("cpu", sinks=True) == "torch"
    assert pa.cache_backend("cpu") == "torch"
    switch(True)  # and TRITON_INTERPRET=1 from the conftest
    assert pa.attention_backend("cpu") == "triton" and pa.cache_backend("cpu") == "triton"
    monkeypatch.setenv("OPDISAGG_RT_DISABLE_TRITON", "1")  # wins over the test switch
    assert pa.attention_backend("cpu") == "torch" and pa.cache_backend("cpu") == "torch"


def test_cuda_picks_triton_or_flash_attn(monkeypatch):
    monkeypatch.delenv("OPDISAGG_RT_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pa.backend, "triton_available", lambda: True)
    monkeypatch.setattr(pa.backend, "flash_attn_available", lambda: False)
    cuda = torch.device("cuda", 0)
    assert pa.attention_backend(cuda) == "triton"
    assert pa.cache_backend(cuda) == "triton"
    monkeypatch.setattr(pa.backend, "flash_attn_available", lambda: True)
    assert pa.attention_backend(cuda, dtype=torch.bfloat16, block_size=256) == "flash_attn"
    # flash-attn cannot serve these: sinks, float32, or pages below its 256-token minimum
    assert pa.attention_backend(cuda, dtype=torch.bfloat16, block_size=256, sinks=True) == "triton"
    assert pa.attention_backend(cuda, dtype=torch.float32, block_size=256) == "triton"
    assert pa.attention_backend(cuda, dtype=torch.bfloat16, block_size=16) == "triton"
    monkeypatch.setattr(pa.backend, "triton_available", lambda: False)
    assert pa.attention_backend(cuda, dtype=torch.float32) == "torch"
    assert pa.cache_backend(cuda) == "torch"
    monkeypatch.setenv("OPDISAGG_RT_DISABLE_TRITON", "1")  # the torch path, flash-attn too
    monkeypatch.setattr(pa.backend, "triton_available", lambda: True)
    assert pa.cache_backend(cuda) == "torch"
    assert pa.attention_backend(cuda, dtype=torch.bfloat16, block_size=256) == "torch"


# ---- the flash-attn glue, against a stand-in with flash-attn's documented semantics ----------------

def _fake_flash_attn():
    """torch versions of flash-attn's two entry points as documented in flash_attn_interface:
    causal masks aligned to the bottom right (query i of n over k keys sits at k - n + i),
    ``window_size=(left, right)`` keeps keys in [p - left, p + right] (-1: unbounded), paged K/V
    through an int32 ``block_table``; all index tensors int32 (flash-attn rejects int64)."""
    import types

    def attend(q, keys, vals, scale, causal, window):  # q [n, H, D], keys [k, KVH, D]
        n, kl = q.shape[0], keys.shape[0]
        g = q.shape[1] // keys.shape[1]
        keys, vals = keys.repeat_interleave(g, 1).float(), vals.repeat_interleave(g, 1).float()
        s = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
        p = torch.arange(n)[:, None] + kl - n
        j = torch.arange(kl)[None, :]
        ok = j <= p if causal else torch.ones(n, kl, dtype=torch.bool)
        if window[0] >= 0:
            ok &= j >= p - window[0]
        s = s.masked_fill(~ok, float("-inf"))
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), vals).to(q.dtype)

    def gather(cache, table, length):
        bs = cache.shape[1]
        return cache[table[: -(-length // bs)].long()].flatten(0, 1)[:length]

    def with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale, causal,
                     window_size):
        assert cache_seqlens.dtype == block_table.dtype == torch.int32
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b])
            out[b] = attend(q[b], gather(k_cache, block_table[b], n),
                            gather(v_cache, block_table[b], n), softmax_scale, causal, window_size)
        return out

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale,
               causal, window_size, block_table):
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == block_table.dtype == torch.int32
        out = torch.empty_like(q)
        for b in range(block_table.shape[0]):
            a, e = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            n = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
            assert e - a <= max_seqlen_q and n <= max_seqlen_k
            out[a:e] = attend(q[a:e], gather(k, block_table[b], n), gather(v, block_table[b], n),
                              softmax_scale, causal, window_size)
        return out

    return types.SimpleNamespace(flash_attn_with_kvcache=with_kvcache,
                                 flash_attn_varlen_func=varlen)


def _mixed_step(dtype: torch.dtype = torch.float32):
    """One step over a random paged cache (shuffled blocks of 4): two decodes (one across a block
    edge), a 7-row prefill over an 8-token cached prefix, a fresh 6-row prefill. Returns
    (q, k, v, k_cache, v_cache, batch) with this step's k, v already in the cache."""
    from opdisagg_rt.step_batch import StepBatch

    g = torch.Generator().manual_seed(0)
    bs, heads, kvh, dim = 4, 4, 2, 8
    seq_lens, q_lens = [9, 4, 15, 6], [1, 1, 7, 6]
    nblk = [-(-s // bs) for s in seq_lens]
    perm = torch.randperm(sum(nblk) + 1, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(nblk), dtype=torch.long)
    used = 0
    for r, nb in enumerate(nblk):
        tables[r, :nb] = torch.tensor(perm[used:used + nb])
        used += nb
    k_cache = torch.randn(sum(nblk) + 1, bs, kvh, dim, generator=g).to(dtype)
    v_cache = torch.randn(sum(nblk) + 1, bs, kvh, dim, generator=g).to(dtype)
    cu = torch.tensor([0] + q_lens).cumsum(0)
    positions = torch.cat([torch.arange(s - n, s) for s, n in zip(seq_lens, q_lens)])
    req = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    batch = StepBatch(
        request_ids=list("abcd"), input_ids=torch.zeros(sum(q_lens), dtype=torch.long),
        positions=positions, slot_mapping=tables[req, positions // bs] * bs + positions % bs,
        query_start_loc=cu, seq_lens=torch.tensor(seq_lens), block_tables=tables,
        logits_indices=cu[1:] - 1, num_decodes=2, query_lens_list=q_lens, seq_lens_list=seq_lens,
        block_size=bs)
    q = torch.randn(sum(q_lens), heads, dim, generator=g).to(dtype)
    k, v = k_cache.flatten(0, 1)[batch.slot_mapping], v_cache.flatten(0, 1)[batch.slot_mapping]
    return q, k, v, k_cache, v_cache, batch


def _fresh(batch):
    """The same step with an empty memo (the paths cache different derived tensors)."""
    from opdisagg_rt.step_batch import StepBatch

    return StepBatch(**{f: getattr(batch, f) for f in StepBatch.__dataclass_fields__ if f != "memo"})


@pytest.mark.parametrize("window", [None, 5])
def test_flash_attn_glue_matches_cpu_path(window, monkeypatch):
    """Decodes, a prefill over a cached prefix and a fresh prefill in one step through
    `_flash_paged_attention` (with the stand-in) equal the CPU path (float32; tolerance 1e-5)."""
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", _fake_flash_attn())
    q, k, v, k_cache, v_cache, batch = _mixed_step()
    scale = q.shape[-1] ** -0.5
    got = pa._flash_paged_attention(q, k_cache, v_cache, batch, scale, window)
    want = pa._torch_paged_attention(q, k, v, k_cache, v_cache, _fresh(batch), scale, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_dispatched_sinks_match_cpu_path(window, dtype, switch):
    """Sinks (gpt-oss) and windows through the dispatched Triton path on a mixed step equal the
    CPU path; tolerance 1e-5 for float32, 2e-2 for bfloat16 (both accumulate in float32)."""
    q, k, v, k_cache, v_cache, batch = _mixed_step(dtype)
    sinks = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(1))
    scale = q.shape[-1] ** -0.5
    want = pa.paged_attention(q, k, v, k_cache, v_cache, _fresh(batch), scale, window, sinks)
    switch(True)
    assert pa.attention_backend("cpu", sinks=True) == "triton"
    got = pa.paged_attention(q, k, v, k_cache, v_cache, _fresh(batch), scale, window, sinks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
