"""Per-request tenant salt (vLLM's `cache_salt`) through the engine, with the real SmolLM2 in
float32: requests with the same prompt and different salts never share KV (neither an in-engine
prefix-cache hit nor a store hit); requests with the same salt do; outputs never change."""
from __future__ import annotations

import pytest
import torch

from opdisagg_rt.engine import Engine
from opdisagg_rt.kvstore.memory import MemoryTier
from opdisagg_rt.sampling import SamplingParams

SP = SamplingParams(temperature=0, max_tokens=4)


def _prompt(seed: int, n: int = 100) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 40000, (n,), generator=g).tolist()


A = _prompt(21)


def engine(model, tier, prefix: bool) -> Engine:
    return Engine(model, dtype="float32", kv_cache_memory=32 << 20, enable_prefix_caching=prefix,
                  num_threads=1, kv_store=[tier], kv_store_chunk_size=32)


def run(e: Engine, prompt, salt=None):
    out = e.generate([prompt], SP, use_tqdm=False, cache_salt=salt)[0]
    e.kv_connector.flush()
    m = out.metrics
    return out.token_ids, (m.num_cached_tokens, m.num_store_tokens)


@pytest.fixture(scope="module")
def reference(smollm2):
    e = Engine(smollm2, dtype="float32", kv_cache_memory=32 << 20, enable_prefix_caching=False, num_threads=1)
    return e.generate([A], SP, use_tqdm=False)[0].token_ids


def test_cache_salt_separates_tenants_in_prefix_cache_and_store(smollm2, reference):
    tier = MemoryTier(256 << 20)
    e = engine(smollm2, tier, prefix=True)
    # vLLM's prompt-dict spelling, then the keyword.
    assert run(e, {"prompt_token_ids": A, "cache_salt": "tenant-a"}) == (reference, (0, 0))
    assert run(e, A, "tenant-b") == (reference, (0, 0))  # neither cache nor store shares across salts
    assert run(e, A) == (reference, (0, 0))  # nor with unsalted requests
    assert run(e, A, "tenant-a") == (reference, (96, 0))  # same salt: in-engine prefix-cache hit
    other = engine(smollm2, tier, prefix=False)  # a second engine: only the store is shared
    assert run(other, A, "tenant-b") == (reference, (0, 96))  # same salt: store hit
    assert run(other, A, "tenant-c") == (reference, (0, 0))
    assert run(other, {"prompt_token_ids": A, "cache_salt": "tenant-a"}) == (reference, (0, 96))
    e.shutdown()
    other.shutdown()


def test_cache_salt_is_validated(smollm2):
    e = engine(smollm2, MemoryTier(1 << 20), prefix=True)
    for bad in ("", 7):
        with pytest.raises(ValueError, match="cache_salt"):
            e.add_request(A, SP, cache_salt=bad)
    with pytest.raises(ValueError, match="conflicts"):
        e.add_request({"prompt_token_ids": A, "cache_salt": "x"}, SP, cache_salt="y")
    with pytest.raises(ValueError, match="exactly one"):
        e.add_request({"prompt": "hi", "prompt_token_ids": A}, SP)
    assert not e.has_unfinished_requests()
    e.shutdown()
