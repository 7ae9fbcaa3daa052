"""Run by test_two_processes_share_through_redis in a fresh interpreter: one engine process that
generates one prompt with a Redis-backed store and reports what it got (JSON on stdout)."""
import json
import sys

import torch

torch.set_num_threads(1)

from opdisagg_rt.engine import Engine  # noqa: E402
from opdisagg_rt.sampling import SamplingParams  # noqa: E402

url, prompt = sys.argv[1], json.loads(sys.argv[2])
engine = Engine(None, dtype="float32", kv_cache_memory=32 << 20, enable_prefix_caching=False, num_threads=1,
                kv_store=url, kv_store_chunk_size=32)
out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
stats = engine.kv_connector.stats()
engine.shutdown()  # flushes the background stores
print(json.dumps({"token_ids": out.token_ids, "store_tokens": out.metrics.num_store_tokens,
                  "error": out.error, "stats": stats}))
