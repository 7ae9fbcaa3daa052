// CUDA kernels of the row-wise ops between the GEMMs (rms_norm, silu_and_mul, rotary_embedding),
// with extern "C" launchers over raw pointers. Only the CUDA runtime, the toolkit's cuda_fp16.h
// and plain C++ here (see elementwise_kernels.h for why).
//
// They are the twins of csrc/cpu/elementwise.cpp. Arithmetic is float32, and bf16/fp16 results
// are rounded at the same points as there (as transformers' Llama modules do):
//   rms_norm:     out = round(weight * round(x * inv_rms)), inv_rms = 1 / sqrt(mean(x^2) + eps)
//   silu_and_mul: out = round(round(silu(gate)) * up)
//   rotary:       one rounding per rotated element
// bf16 is converted with the same bit arithmetic as the CPU kernel (round to nearest even, NaN
// -> 0x7fc0). The conversions are written as explicit intrinsics, so they also build under
// torch's -D__CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ flags.
//
// rms_norm and silu_and_mul are templated on a pack of N elements. The launcher picks the widest
// pack (up to 16 bytes) that divides every pointer, row size and stride, so rows of 16-byte
// multiples (the common case) move as 128-bit loads.
//
// out and input are not __restrict__: out may alias input (an in-place rms_norm, as the CPU
// kernel allows). Each thread reads an element before it writes that element, and no thread
// reads an element after another thread has written it.
#include "elementwise_kernels.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

// Widest pack in bytes (16, 8, 4, 2 or 1) dividing `bits`: addresses, sizes and strides OR-ed.
int pack_bytes(uint64_t bits) {
  int w = 16;
  while (w > 1 && (bits % w) != 0) w /= 2;
  return w;
}

int elem_bytes(opdisagg_elem_kind kind) {
  switch (kind) {
    case OPDISAGG_ELEM_F32: return 4;
    case OPDISAGG_ELEM_BF16:
    case OPDISAGG_ELEM_F16: return 2;
  }
  return 0;
}

// Threads for `work` items: a whole number of warps (block_sum needs full warps), in [32, cap].
int threads_for(int64_t work, int cap) {
  const int64_t warps = (work + 31) / 32;
  const int64_t t = warps * 32;
  return t < 32 ? 32 : (t > cap ? cap : (int)t);
}

// ---- storage types: load to float32, store from float32 -------------------------------------
struct F32 {
  using raw = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
struct BF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(uint16_t x) {
    return __uint_as_float((uint32_t)x << 16);
  }
  // Round to nearest even without branches (NaN stays a quiet NaN), as c10 and the CPU kernel.
  static __device__ __forceinline__ uint16_t store(float x) {
    const uint32_t u = __float_as_uint(x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
  }
};
struct F16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(uint16_t x) {
    return __half2float(__ushort_as_half(x));
  }
  static __device__ __forceinline__ uint16_t store(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

// The value x takes after a round trip through the storage dtype (identity for float32).
template <class T>
__device__ __forceinline__ float round_to(float x) {
  return T::load(T::store(x));
}

// N elements loaded or stored as one aligned access.
template <class R, int N>
struct alignas(sizeof(R) * N) Pack {
  R v[N];
};

// Sum over the block. blockDim.x must be a multiple of 32. Every thread gets the result. It uses
// one shared buffer, so a kernel calls it once (a second call would need a __syncthreads first).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- rms_norm: one block per row --------------------------------------------------------------
// out = weight * round(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm: normalize in
// float32, cast to the input dtype, then multiply by the weight in that dtype. hidden % N == 0.
template <class T, int N>
__global__ void rms_norm_kernel(typename T::raw* out, const typename T::raw* x,
                                const typename T::raw* __restrict__ weight, int64_t hidden,
                                int64_t out_stride, int64_t x_stride, float eps) {
  using P = Pack<typename T::raw, N>;
  const int64_t r = blockIdx.x;
  const P* xr = reinterpret_cast<const P*>(x + r * x_stride);
  const P* w = reinterpret_cast<const P*>(weight);
  P* o = reinterpret_cast<P*>(out + r * out_stride);
  const int64_t packs = hidden / N;

  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P p = xr[i];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float f = T::load(p.v[j]);
      ss += f * f;
    }
  }
  ss = block_sum(ss);
  // 1 / sqrt (both IEEE-rounded without --use_fast_math), as the CPU kernel; not rsqrtf.
  const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);

  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P px = xr[i], pw = w[i];
    P po;
#pragma unroll
    for (int j = 0; j < N; ++j)
      po.v[j] = T::store(T::load(pw.v[j]) * round_to<T>(T::load(px.v[j]) * inv));
    o[i] = po;
  }
}

// ---- silu_and_mul: grid (rows, chunks of the row) ---------------------------------------------
// out = round(silu(gate)) * up over input = [gate | up], as transformers' `act_fn(gate) * up` in
// the model dtype (silu's result is rounded before the product). d % N == 0.
template <class T, int N>
__global__ void silu_and_mul_kernel(typename T::raw* out, const typename T::raw* x, int64_t d,
                                    int64_t out_stride, int64_t x_stride) {
  using P = Pack<typename T::raw, N>;
  const int64_t r = blockIdx.x;
  const P* g = reinterpret_cast<const P*>(x + r * x_stride);
  const P* u = reinterpret_cast<const P*>(x + r * x_stride + d);
  P* o = reinterpret_cast<P*>(out + r * out_stride);
  const int64_t packs = d / N;
  const int64_t step = (int64_t)gridDim.y * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; i < packs; i += step) {
    const P pg = g[i], pu = u[i];
    P po;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float gv = T::load(pg.v[j]);
      po.v[j] = T::store(round_to<T>(gv / (1.0f + expf(-gv))) * T::load(pu.v[j]));
    }
    o[i] = po;
  }
}

// ---- rotary_embedding: one block per token, threads over (head, pair) -------------------------
// In place; the table row is [cos | sin] of rot / 2 entries each. Neox style pairs dims
// (i, i + rot/2) (Llama's rotate_half); GPT-J style pairs (2i, 2i + 1). The products use
// __fmul_rn so they are not contracted into FMAs: the result is x1*c - x2*s with each product
// rounded, as the torch reference and the CPU kernel's default build compute it.
template <class T, bool kNeox>
__global__ void rotary_embedding_kernel(const int64_t* __restrict__ positions,
                                        typename T::raw* query, typename T::raw* key,
                                        const float* __restrict__ table, int64_t rot,
                                        int64_t num_heads, int64_t num_kv_heads, int64_t q_tok,
                                        int64_t q_head, int64_t k_tok, int64_t k_head,
                                        int64_t max_position) {
  const int64_t t = blockIdx.x;
  const int64_t pos = positions[t];
  if (pos < 0 || pos >= max_position) return;  // the CPU twin raises; see the header
  const int64_t half = rot / 2;
  const float* cos = table + pos * rot;
  const float* sin = cos + half;
  const int64_t pairs = (num_heads + num_kv_heads) * half;
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int64_t h = i / half, j = i % half;
    typename T::raw* v = h < num_heads ? query + t * q_tok + h * q_head
                                       : key + t * k_tok + (h - num_heads) * k_head;
    typename T::raw* p1 = v + (kNeox ? j : 2 * j);
    typename T::raw* p2 = p1 + (kNeox ? half : 1);
    const float x1 = T::load(*p1), x2 = T::load(*p2), c = cos[j], s = sin[j];
    *p1 = T::store(__fmul_rn(x1, c) - __fmul_rn(x2, s));
    *p2 = T::store(__fmul_rn(x2, c) + __fmul_rn(x1, s));
  }
}

template <class T>
struct Type {
  using type = T;
};
template <class T, int N>
struct Spec {
  using type = T;
  static constexpr int n = N;
};

// Calls f(Type<T>{}) with the storage type of `kind`, then reports launch errors.
template <class F>
cudaError_t with_type(opdisagg_elem_kind kind, F&& f) {
  switch (kind) {
    case OPDISAGG_ELEM_F32: f(Type<F32>{}); break;
    case OPDISAGG_ELEM_BF16: f(Type<BF16>{}); break;
    case OPDISAGG_ELEM_F16: f(Type<F16>{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Calls f(Spec<T, N>{}) with the storage type of `kind` and a pack of N = n elements (n <= 16
// bytes / element, so float32 never gets an 8-element pack), then reports launch errors.
template <class F>
cudaError_t with_spec(opdisagg_elem_kind kind, int n, F&& f) {
  return with_type(kind, [&](auto type) {
    using T = typename decltype(type)::type;
    constexpr int kMaxN = 16 / (int)sizeof(typename T::raw);
    switch (n) {
      case 8: f(Spec<T, (kMaxN < 8 ? kMaxN : 8)>{}); break;
      case 4: f(Spec<T, 4>{}); break;
      case 2: f(Spec<T, 2>{}); break;
      default: f(Spec<T, 1>{}); break;
    }
  });
}

}  // namespace

extern "C" cudaError_t opdisagg_rms_norm_launch(void* out, const void* input, const void* weight,
                                                int64_t rows, int64_t hidden,
                                                int64_t out_row_stride, int64_t input_row_stride,
                                                float epsilon, opdisagg_elem_kind kind,
                                                cudaStream_t stream) {
  const int64_t e = elem_bytes(kind);
  if (e == 0 || rows > kMaxGridX) return cudaErrorInvalidValue;
  if (rows == 0 || hidden == 0) return cudaSuccess;
  const uint64_t bits = (uint64_t)(uintptr_t)out | (uint64_t)(uintptr_t)input |
                        (uint64_t)(uintptr_t)weight |
                        (uint64_t)(hidden * e | out_row_stride * e | input_row_stride * e);
  const int n = pack_bytes(bits) >= e ? pack_bytes(bits) / (int)e : 1;
  const int threads = threads_for(hidden / n, kMaxThreads);
  return with_spec(kind, n, [&](auto spec) {
    using S = decltype(spec);
    using T = typename S::type;
    using R = typename T::raw;
    rms_norm_kernel<T, S::n><<<(unsigned)rows, threads, 0, stream>>>(
        (R*)out, (const R*)input, (const R*)weight, hidden, out_row_stride, input_row_stride,
        epsilon);
  });
}

extern "C" cudaError_t opdisagg_silu_and_mul_launch(void* out, const void* input, int64_t rows,
                                                    int64_t d, int64_t out_row_stride,
                                                    int64_t input_row_stride,
                                                    opdisagg_elem_kind kind, cudaStream_t stream) {
  const int64_t e = elem_bytes(kind);
  if (e == 0 || rows > kMaxGridX) return cudaErrorInvalidValue;
  if (rows == 0 || d == 0) return cudaSuccess;
  const uint64_t bits = (uint64_t)(uintptr_t)out | (uint64_t)(uintptr_t)input |
                        (uint64_t)(d * e | out_row_stride * e | input_row_stride * e);
  const int n = pack_bytes(bits) >= e ? pack_bytes(bits) / (int)e : 1;
  const int64_t packs = d / n;
  const int threads = threads_for(packs, kThreads);
  // Rows on grid x; a long row (decode: few rows, d in the thousands) also spreads over grid y.
  int64_t chunks = (packs + threads - 1) / threads;
  if (chunks > kMaxGridY) chunks = kMaxGridY;
  const dim3 grid((unsigned)rows, (unsigned)chunks);
  return with_spec(kind, n, [&](auto spec) {
    using S = decltype(spec);
    using T = typename S::type;
    using R = typename T::raw;
    silu_and_mul_kernel<T, S::n><<<grid, threads, 0, stream>>>((R*)out, (const R*)input, d,
                                                               out_row_stride, input_row_stride);
  });
}

extern "C" cudaError_t opdisagg_rotary_embedding_launch(
    const int64_t* positions, void* query, void* key, const float* cos_sin_cache,
    int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t rotary_dim,
    int64_t query_token_stride, int64_t query_head_stride, int64_t key_token_stride,
    int64_t key_head_stride, int64_t max_position, int is_neox, opdisagg_elem_kind kind,
    cudaStream_t stream) {
  if (elem_bytes(kind) == 0 || num_tokens > kMaxGridX || rotary_dim % 2 != 0)
    return cudaErrorInvalidValue;
  const int64_t pairs = (num_heads + num_kv_heads) * (rotary_dim / 2);
  if (num_tokens == 0 || pairs == 0) return cudaSuccess;
  const int threads = threads_for(pairs, kThreads);
  return with_type(kind, [&](auto type) {
    using T = typename decltype(type)::type;
    using R = typename T::raw;
    if (is_neox)
      rotary_embedding_kernel<T, true><<<(unsigned)num_tokens, threads, 0, stream>>>(
          positions, (R*)query, (R*)key, cos_sin_cache, rotary_dim, num_heads, num_kv_heads,
          query_token_stride, query_head_stride, key_token_stride, key_head_stride,
          max_position);
    else
      rotary_embedding_kernel<T, false><<<(unsigned)num_tokens, threads, 0, stream>>>(
          positions, (R*)query, (R*)key, cos_sin_cache, rotary_dim, num_heads, num_kv_heads,
          query_token_stride, query_head_stride, key_token_stride, key_head_stride,
          max_position);
  });
}
