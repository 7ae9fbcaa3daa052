"""Benchmark of ops.paged_attention on the engine's decode shape (32 decode requests, H=9, KVH=3,
head_dim=64, block_size=16, seq_lens 128..256, blocks scattered in a pool of 6000 blocks).

Prints the median µs per call (2 threads) of the kernel and of a gather + SDPA baseline, and the
max abs error vs ops.paged_attention_ref.
Usage: python bench/paged_attention_bench.py [reps] [threads] [nosdpa]
OPDISAGG_PA_DECODE_FAST=0 in the environment disables the bf16 decode fast path (generic kernel).
"""
import sys
import time

import torch

from opdisagg_rt import ops

# Kernel before the per-request AVX512-BF16 decode path (quiet machine, 2 threads, median).
PREVIOUS_US = {torch.bfloat16: 850.0}


def make(dtype, R=32, H=9, KVH=3, D=64, bs=16, pool=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    sl = torch.randint(128, 257, (R,), generator=g)
    nb = (sl + bs - 1) // bs
    maxb = int(nb.max())
    perm = torch.randperm(pool, generator=g)
    bt = torch.zeros(R, maxb, dtype=torch.long)
    used = 0
    for r in range(R):
        bt[r, : nb[r]] = perm[used: used + nb[r]]
        used += int(nb[r])
    kc = torch.randn(pool, bs, KVH, D, generator=g).to(dtype)
    vc = torch.randn(pool, bs, KVH, D, generator=g).to(dtype)
    q = torch.randn(R, H, D, generator=g).to(dtype)
    qsl = torch.arange(R + 1, dtype=torch.long)
    return q, kc, vc, bt, qsl, sl


def timeit(fn, reps):
    for _ in range(10):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6, ts[0] * 1e6


def sdpa_baseline(q, kc, vc, bt, sl, scale):
    bs, KVH, D = kc.shape[1:]
    H = q.shape[1]
    outs = []
    for r in range(q.shape[0]):
        L = int(sl[r])
        blocks = bt[r, : (L + bs - 1) // bs]
        k = kc[blocks].reshape(-1, KVH, D)[:L].transpose(0, 1)  # [KVH, L, D]
        v = vc[blocks].reshape(-1, KVH, D)[:L].transpose(0, 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[r][:, None], k, v, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(outs)


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    skip_sdpa = len(sys.argv) > 3 and sys.argv[3] == "nosdpa"
    torch.set_num_threads(threads)
    print(f"threads={threads}, reps={reps}; median (min) µs per call")
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        q, kc, vc, bt, qsl, sl = make(dtype)
        scale = q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        ref = torch.empty_like(q)
        ops.paged_attention_ref(ref, q, kc, vc, bt, qsl, sl, scale)
        ops.paged_attention(out, q, kc, vc, bt, qsl, sl, scale)
        err = (out.float() - ref.float()).abs().max().item()
        us, us_min = timeit(lambda: ops.paged_attention(out, q, kc, vc, bt, qsl, sl, scale), reps)
        us_sdpa = (float("nan"),) if skip_sdpa else timeit(
            lambda: sdpa_baseline(q, kc, vc, bt, sl, scale), max(20, reps // 20))
        kv_bytes = 2 * int(sl.sum()) * kc.shape[2] * kc.shape[3] * kc.element_size()
        prev = PREVIOUS_US.get(dtype)
        prev_s = f"  (previous kernel {prev:.0f} µs)" if prev else ""
        print(f"{str(dtype):15s} paged_attention {us:8.1f} ({us_min:7.1f}) µs  "
              f"{kv_bytes / us_min / 1e3:5.1f} GB/s(min)  gather+SDPA {us_sdpa[0]:8.1f} µs  "
              f"max|err| vs ref {err:.2e}{prev_s}")


if __name__ == "__main__":
    main()
