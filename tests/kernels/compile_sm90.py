"""Compile every Triton kernel of opdisagg_rt.kernels for a real GPU target (sm_90), no GPU needed.

The interpreter runs kernels in numpy and accepts things the GPU compiler rejects (tl.dot on
tiles under 16, type mismatches across loop iterations, unsupported ops). This script lowers
each kernel through triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
bundled ptxas) for ``GPUTarget("cuda", 90, 32)``, with the constexpr combinations the wrappers
use (moderate tile sizes, to keep a cold compile short; triton caches the results). Run by
tests/kernels/test_kernels_backend.py in a subprocess (TRITON_INTERPRET unset);
usable by hand: ``python tests/kernels/compile_sm90.py``. Exit code 0 when all compile; 3 when
the toolchain itself is unusable here (the test skips then).
"""
from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict[str, str], constexprs: dict[str, object]) -> None:
    """``types``: non-constexpr argument types by name (others default to ``*fp32`` for
    ``*_ptr`` arguments and ``i32`` otherwise)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            sig[name] = "*fp32" if name.endswith("_ptr") else "i32"
    triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                   target=TARGET)


def _smoke() -> bool:
    @triton.jit
    def _k(x_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(x_ptr + o, tl.load(x_ptr + o) + 1)

    try:
        compile_kernel(_k, {}, {"N": 16})
    except Exception as e:  # no ptxas / backend here
        print(f"toolchain unusable: {type(e).__name__}: {e}")
        return False
    return True


def cases():
    from importlib import import_module

    from opdisagg_rt.kernels.attention import decode, prefill
    from opdisagg_rt.kernels.gated_delta_rule import chunk as gdr_chunk
    from opdisagg_rt.kernels.gated_delta_rule import fused_recurrent as gdr_rec
    from opdisagg_rt.kernels.lightning_attn import chunk as la_chunk
    from opdisagg_rt.kernels.lightning_attn import fused_recurrent as la_rec
    # (the packages re-export functions named like these modules: import the modules)
    rc = import_module("opdisagg_rt.kernels.cache.reshape_and_cache")
    gg = import_module("opdisagg_rt.kernels.moe.grouped_gemm")

    bf16 = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
            "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
            "scale": "fp32"}
    for splits, window, sinks in ((1, False, False), (4, True, True)):
        yield (f"paged_decode splits={splits} window={window} sinks={sinks}",
               decode._paged_decode_kernel,
               bf16, dict(NUM_HEADS=32, GROUP=4, BLOCK_SIZE=16, BLOCK_G=16, BLOCK_D=64,
                          BLOCK_N=64, NUM_SPLITS=splits, HAS_WINDOW=window, USE_SINKS=sinks,
                          PRECISION="tf32"))
    yield ("paged_decode_reduce", decode._paged_decode_reduce_kernel, bf16,
           dict(NUM_HEADS=32, NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=64, USE_SINKS=True))
    for window, sinks, prec in ((False, False, "tf32"), (True, True, "tf32x3")):
        yield (f"paged_prefill window={window} sinks={sinks}", prefill._paged_prefill_kernel,
               bf16 if prec == "tf32" else {"scale": "fp32"},
               dict(GROUP=4, BLOCK_SIZE=16, BLOCK_Q=8, BLOCK_M=32, BLOCK_D=64, BLOCK_N=32,
                    HAS_WINDOW=window, USE_SINKS=sinks, PRECISION=prec))
    yield ("reshape_and_cache", rc._reshape_and_cache_kernel,
           {"key_ptr": "*bf16", "value_ptr": "*bf16", "key_cache_ptr": "*bf16",
            "value_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"},
           dict(BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128))
    la = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16",
          "cu_seqlens_ptr": "*i32", "state_indices_ptr": "*i32", "scale": "fp32"}
    yield ("chunk_lightning_attn", la_chunk._chunk_lightning_fwd_kernel, la,
           dict(H=16, BT=32, BK=64, BV=32, IS_VARLEN=True, HAS_INIT=True, STORE_FINAL=True,
                PRECISION="tf32"))
    yield ("fused_recurrent_lightning_attn", la_rec._fused_recurrent_lightning_kernel, la,
           dict(H=16, BK=128, BV=64, IS_VARLEN=False, HAS_INDICES=True))
    gd = dict(la, g_ptr="*fp32", beta_ptr="*bf16")
    for prec in ("tf32", "tf32x3"):
        yield (f"chunk_gated_delta_rule {prec}", gdr_chunk._chunk_gdr_fwd_kernel, gd,
               dict(HV=32, GROUP=2, BT=32, BK=64, BV=32, IS_VARLEN=True, HAS_INIT=True,
                    STORE_FINAL=True, USE_L2NORM=True, PRECISION=prec))
    yield ("fused_recurrent_gated_delta_rule", gdr_rec._fused_recurrent_gdr_kernel, gd,
           dict(HV=32, GROUP=2, BK=128, BV=64, IS_VARLEN=True, HAS_INDICES=True, USE_L2NORM=True))
    yield ("grouped_gemm", gg._grouped_gemm_kernel,
           {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
            "offsets_ptr": "*i64", "tile_start_ptr": "*i32"},
           dict(E=8, LOG_E=4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, HAS_BIAS=True, PRECISION="tf32"))


def main() -> int:
    if not _smoke():
        return 3
    failed = 0
    for name, fn, types, constexprs in cases():
        t0 = time.time()
        try:
            compile_kernel(fn, types, constexprs)
            print(f"ok    {name} ({time.time() - t0:.1f}s)")
        except Exception as e:
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
