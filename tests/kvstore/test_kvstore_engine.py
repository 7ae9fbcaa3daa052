"""The store inside the engine, with the real SmolLM2 in float32 and greedy decoding: a store hit
gives the same tokens as recomputing; disk entries outlive the engine; corrupt entries are
recomputed; tenants never share; Redis dying mid-run fails nothing; two processes share."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from opdisagg_rt.engine import Engine
from opdisagg_rt.kvstore.keys import key_name
from opdisagg_rt.kvstore.memory import MemoryTier
from opdisagg_rt.sampling import SamplingParams

CHUNK = 32  # two 16-token blocks: small chunks keep prompts (and the test) short
SP = SamplingParams(temperature=0, max_tokens=4)


def prompt(seed: int, n: int = 100) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 40000, (n,), generator=g).tolist()


A, B, C = prompt(1), prompt(2), prompt(3)


def engine(model, kv_store=None, prefix=False, **kw) -> Engine:
    return Engine(model, dtype="float32", kv_cache_memory=32 << 20, enable_prefix_caching=prefix,
                  num_threads=1, kv_store=kv_store, kv_store_chunk_size=CHUNK, **kw)


def run(e: Engine, *prompts):
    outs = e.generate(list(prompts), SP, use_tqdm=False)
    if e.kv_connector is not None:
        e.kv_connector.flush()
    return outs


@pytest.fixture(scope="module")
def reference(smollm2):
    """Tokens without any store (and without the prefix cache): the ground truth."""
    e = engine(smollm2)
    alt = A[:70] + prompt(9, 30)
    outs = run(e, A, B, C, alt)
    return {"A": outs[0].token_ids, "B": outs[1].token_ids, "C": outs[2].token_ids, "alt": outs[3].token_ids,
            "alt_prompt": alt}


def test_store_hit_is_token_identical(smollm2, reference):
    e = engine(smollm2, "cpu")
    first = run(e, A)[0]
    assert first.metrics.num_store_tokens == 0 and first.token_ids == reference["A"]
    again, alt = run(e, A, reference["alt_prompt"])  # a full hit, and a 2-chunk partial hit
    assert again.metrics.num_store_tokens == 96 and again.metrics.num_computed_prompt_tokens == 4
    assert alt.metrics.num_store_tokens == 64
    assert again.token_ids == reference["A"] and alt.token_ids == reference["alt"]
    s = e.kv_connector.stats()
    assert s["load_chunks"] == 5 and s["store_chunks"] >= 3 and s["corrupt"] == 0
    e.shutdown()


def test_store_extends_the_in_engine_prefix_cache(smollm2, reference):
    """In-engine hit of 48 tokens (3 blocks, not a chunk boundary) + the store supplies the rest."""
    tier = MemoryTier(256 << 20)
    writer = engine(smollm2, [tier])
    run(writer, A)
    reader = engine(smollm2, [tier], prefix=True)
    run(reader, A[:48] + prompt(5, 20))  # puts A's first 3 blocks in reader's prefix cache
    out = run(reader, A)[0]
    m = out.metrics
    assert (m.num_cached_tokens, m.num_store_tokens, m.num_computed_prompt_tokens) == (48, 48, 4)
    assert out.token_ids == reference["A"]
    writer.shutdown()
    reader.shutdown()


def test_disk_tier_survives_engine_restart(smollm2, reference, tmp_path):
    e = engine(smollm2, f"disk:{tmp_path}")
    run(e, A)
    e.shutdown()
    del e
    e2 = engine(smollm2, f"disk:{tmp_path}")
    out = run(e2, A)[0]
    assert out.metrics.num_store_tokens == 96 and out.token_ids == reference["A"]
    e2.shutdown()


def test_corrupt_entries_are_detected_and_recomputed(smollm2, reference, tmp_path, caplog):
    e = engine(smollm2, f"disk:{tmp_path}")
    run(e, A)
    ks, tier = e.kv_connector.ks, e.kv_connector.store.tiers[0]
    files = [tier._file(key_name(k)) for k in ks.chunk_keys(A)]
    assert all(os.path.exists(f) for f in files)
    with open(files[1], "r+b") as f:  # flip bytes in the middle of chunk 1's tensor
        f.seek(os.path.getsize(files[1]) // 2)
        b = f.read(4)
        f.seek(-4, 1)
        f.write(bytes(x ^ 0xFF for x in b))
    with caplog.at_level(logging.WARNING):
        out = run(e, A)[0]
    assert out.metrics.num_store_tokens == 32  # chunk 0 loaded, chunks 1.. recomputed
    assert out.token_ids == reference["A"] and e.kv_connector.stats()["corrupt"] == 1
    assert "corrupt" in caplog.text
    with open(files[0], "r+b") as f:  # now a truncated file
        f.truncate(os.path.getsize(files[0]) - 100)
    out = run(e, A)[0]
    assert out.metrics.num_store_tokens == 0 and out.token_ids == reference["A"]
    assert e.kv_connector.stats()["corrupt"] == 2
    assert run(e, A)[0].metrics.num_store_tokens == 96  # rewritten by the recompute
    e.shutdown()


def test_tenant_salts_never_share(smollm2, reference, tmp_path):
    store = f"disk:{tmp_path}"
    a = engine(smollm2, store, kv_store_salt="tenant-a")
    run(a, A)
    b = engine(smollm2, store, kv_store_salt="tenant-b")
    out_b = run(b, A)[0]
    nosalt = engine(smollm2, store)
    out_n = run(nosalt, A)[0]
    assert out_b.metrics.num_store_tokens == 0 and out_n.metrics.num_store_tokens == 0
    assert out_b.token_ids == out_n.token_ids == reference["A"]
    assert run(a, A)[0].metrics.num_store_tokens == 96  # the same tenant does share
    for x in (a, b, nosalt):
        x.shutdown()


def test_redis_killed_mid_run_fails_no_request(smollm2, reference, redis_server, caplog):
    e = engine(smollm2, redis_server.url)
    e.kv_connector.store.min_backoff_s = 0.2
    run(e, A)  # A's chunks now live in Redis
    with caplog.at_level(logging.WARNING):
        for p in (A, B, C):
            e.add_request(p, SP)
        outs = e.step()  # A admitted with a Redis hit, B and C started
        redis_server.kill()
        while e.has_unfinished_requests():
            outs += e.step()
        e.kv_connector.flush()
        done = {o.request_id: o for o in outs if o.finished}
        assert len(done) == 3 and all(o.error is None and o.finish_reason == "length" for o in done.values())
        # By request id, not finish order: A's (failing) load runs while B and C compute.
        assert [done[r].token_ids for r in sorted(done, key=int)] == [reference["A"], reference["B"], reference["C"]]
        assert run(e, B)[0].token_ids == reference["B"]  # still serving while Redis is down
        assert caplog.text.count("unavailable") == 1
        redis_server.start()  # same port, empty: the store recovers by itself
        time.sleep(0.5)
        run(e, C)
        run(e, C)
        out = run(e, C)[0]
    assert out.metrics.num_store_tokens == 96 and out.token_ids == reference["C"]
    assert "is back" in caplog.text
    e.shutdown()


def test_two_processes_share_through_redis(reference, redis_server):
    def proc() -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "_share_worker.py"),
                            redis_server.url, json.dumps(A)], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = proc()
    assert first["store_tokens"] == 0 and first["stats"]["store_chunks"] == 3
    second = proc()  # a new process that never saw A
    assert second["store_tokens"] == 96 and second["error"] is None
    assert first["token_ids"] == second["token_ids"] == reference["A"]
