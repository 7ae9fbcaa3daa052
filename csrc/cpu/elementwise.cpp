// CPU kernels of the row-wise ops between the GEMMs: rms_norm, silu_and_mul, rotary_embedding.
//
// torch's generic kernels for these pay for dtype conversions and temporaries on every call
// (rms_norm on 2048 x 576 bf16: ~1.8 ms, silu(g) * u on 2048 x 1536: ~2.4 ms), which made them a
// quarter of a prefill step; here each is one pass over its rows. Arithmetic is float32; bf16
// results are rounded at the same points as transformers' Llama modules (see each kernel), so a
// bf16 engine tracks HF's bf16 numerics instead of merely approximating them.
//
// The loops are written for the autovectorizer (branchless bf16 <-> f32, a polynomial exp) and
// compiled in several ISA variants (target_clones) picked at load time by CPUID.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OPDISAGG_EW_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OPDISAGG_EW_CLONES
#endif
#define OPDISAGG_INLINE inline __attribute__((always_inline))

namespace opdisagg {
namespace {

// Rows per parallel task: about 32K elements each, so a decode batch (32 rows of a few hundred)
// runs on the calling thread; waking the OpenMP pool costs more than such a call.
int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_elems));
}

OPDISAGG_INLINE float f32_from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
OPDISAGG_INLINE uint32_t f32_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Round-to-nearest-even float -> bf16 without branches (NaN stays a quiet NaN), as c10 does.
OPDISAGG_INLINE uint16_t bf16_bits(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);
}

// 16 floats: one zmm in the AVX-512 clone, two ymm / four xmm in the others (GCC vector
// extensions, so every clone gets the same code and the scalar tails share the formulas).
typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

struct F32 {
  using raw = float;
  static OPDISAGG_INLINE float load(float x) { return x; }
  static OPDISAGG_INLINE float store(float x) { return x; }
  static OPDISAGG_INLINE v16 vload(const float* p) {
    v16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static OPDISAGG_INLINE void vstore(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
  static OPDISAGG_INLINE void vload2(const float* p, v16& a, v16& b) { a = vload(p), b = vload(p + 16); }
  static OPDISAGG_INLINE void vstore2(float* p, v16 a, v16 b) { vstore(p, a), vstore(p + 16, b); }
};
struct BF16 {
  using raw = uint16_t;
  static OPDISAGG_INLINE float load(uint16_t x) { return f32_from_bits(uint32_t(x) << 16); }
  static OPDISAGG_INLINE uint16_t store(float x) { return bf16_bits(x); }
  static OPDISAGG_INLINE v16 vload(const uint16_t* p) {
    v16h h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_bit_cast(v16, __builtin_convertvector(h, v16u) << 16);
  }
  // Rounded to nearest even in place: the bf16 value in the upper half of the f32 bits (a NaN
  // becomes c10's quiet NaN 0x7fc0), so a round trip needs no narrowing and widening.
  static OPDISAGG_INLINE v16u vround_bits(v16 v) {
    const v16u u = __builtin_bit_cast(v16u, v);
    const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return (u & 0x7fffffffu) > 0x7f800000u ? v16u{} + 0x7fc00000u : rounded;
  }
  static OPDISAGG_INLINE v16 vround(v16 v) { return __builtin_bit_cast(v16, vround_bits(v)); }
  static OPDISAGG_INLINE void vstore(uint16_t* p, v16 v) {
    const v16h h = __builtin_convertvector(vround_bits(v) >> 16, v16h);
    std::memcpy(p, &h, sizeof(h));
  }
  // 32 values as their even and odd positions: every step stays in 32-bit lanes (GCC splits the
  // 16-bit <-> 32-bit conversions of vload/vstore into 128-bit pieces, ~3x slower per value).
  static OPDISAGG_INLINE void vload2(const uint16_t* p, v16& even, v16& odd) {
    v16u w;
    std::memcpy(&w, p, sizeof(w));
    even = __builtin_bit_cast(v16, w << 16);
    odd = __builtin_bit_cast(v16, w & 0xffff0000u);
  }
  static OPDISAGG_INLINE void vstore2(uint16_t* p, v16 even, v16 odd) {
    const v16u w = (vround_bits(even) >> 16) | vround_bits(odd);
    std::memcpy(p, &w, sizeof(w));
  }
};
struct F16 {  // rare on CPU: scalar conversions through c10
  using raw = uint16_t;
  static OPDISAGG_INLINE float load(uint16_t x) { return float(c10::Half(x, c10::Half::from_bits())); }
  static OPDISAGG_INLINE uint16_t store(float x) { return c10::Half(x).x; }
  static OPDISAGG_INLINE v16 vload(const uint16_t* p) {
    v16 v;
    for (int i = 0; i < 16; ++i) v[i] = load(p[i]);
    return v;
  }
  static OPDISAGG_INLINE void vstore(uint16_t* p, v16 v) {
    for (int i = 0; i < 16; ++i) p[i] = store(v[i]);
  }
  static OPDISAGG_INLINE void vload2(const uint16_t* p, v16& a, v16& b) { a = vload(p), b = vload(p + 16); }
  static OPDISAGG_INLINE void vstore2(uint16_t* p, v16 a, v16 b) { vstore(p, a), vstore(p + 16, b); }
};
// The value x takes after a round trip through the storage dtype (identity for float32).
template <class T>
OPDISAGG_INLINE float round_to(float x) {
  return T::load(T::store(x));
}
template <class T>
OPDISAGG_INLINE v16 vround_to(v16 x) {
  if constexpr (std::is_same_v<T, F32>) {
    return x;
  } else if constexpr (std::is_same_v<T, BF16>) {
    return BF16::vround(x);
  } else {
    typename T::raw tmp[16];
    T::vstore(tmp, x);
    return T::vload(tmp);
  }
}

// exp(x): Cephes' expf polynomial on x = k ln2 + r, scaled by 2^k via the exponent bits;
// relative error ~2e-7; x clamped to [-87, 88] (exp(-87) ~ 1.6e-38, exp(88) ~ 1.7e38).
template <class V, class I>
OPDISAGG_INLINE V exp_poly(V x) {
  const V xc = x < -87.0f ? V{} - 87.0f : (x > 88.0f ? V{} + 88.0f : x);
  const V k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  return y * __builtin_bit_cast(V, (__builtin_convertvector(k, I) + 127) << 23);
}
typedef float v1 __attribute__((vector_size(4)));
typedef int32_t v1i __attribute__((vector_size(4)));
OPDISAGG_INLINE float exp_approx(float x) { return exp_poly<v1, v1i>(v1{x})[0]; }
OPDISAGG_INLINE v16 vexp(v16 x) { return exp_poly<v16, v16i>(x); }

OPDISAGG_INLINE float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// ---- rms_norm -------------------------------------------------------------------------------
// out = weight * round(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm: normalize in
// float32, cast to the input dtype, then multiply by the weight in that dtype.
template <class T>
OPDISAGG_INLINE void rms_norm_rows(typename T::raw* out, int64_t out_stride, const typename T::raw* x,
                                   int64_t x_stride, const typename T::raw* w, int64_t rows,
                                   int64_t hidden, float eps) {
  const int64_t vec_end = hidden & ~int64_t{31};
  for (int64_t r = 0; r < rows; ++r) {
    const typename T::raw* xr = x + r * x_stride;
    typename T::raw* o = out + r * out_stride;
    v16 acc0{}, acc1{};
    for (int64_t i = 0; i < vec_end; i += 32) {
      v16 a, b;
      T::vload2(xr + i, a, b);
      acc0 += a * a;
      acc1 += b * b;
    }
    float ss = hsum(acc0 + acc1);
    for (int64_t i = vec_end; i < hidden; ++i) ss += T::load(xr[i]) * T::load(xr[i]);
    const float inv = 1.0f / std::sqrt(ss / float(hidden) + eps);
    for (int64_t i = 0; i < vec_end; i += 32) {
      v16 a, b, wa, wb;
      T::vload2(xr + i, a, b);
      T::vload2(w + i, wa, wb);
      T::vstore2(o + i, wa * vround_to<T>(a * inv), wb * vround_to<T>(b * inv));
    }
    for (int64_t i = vec_end; i < hidden; ++i)
      o[i] = T::store(T::load(w[i]) * round_to<T>(T::load(xr[i]) * inv));
  }
}

OPDISAGG_EW_CLONES void rms_norm_f32(float* o, int64_t os, const float* x, int64_t xs, const float* w,
                                     int64_t rows, int64_t hidden, float eps) {
  rms_norm_rows<F32>(o, os, x, xs, w, rows, hidden, eps);
}
OPDISAGG_EW_CLONES void rms_norm_bf16(uint16_t* o, int64_t os, const uint16_t* x, int64_t xs,
                                      const uint16_t* w, int64_t rows, int64_t hidden, float eps) {
  rms_norm_rows<BF16>(o, os, x, xs, w, rows, hidden, eps);
}
OPDISAGG_EW_CLONES void rms_norm_f16(uint16_t* o, int64_t os, const uint16_t* x, int64_t xs,
                                     const uint16_t* w, int64_t rows, int64_t hidden, float eps) {
  rms_norm_rows<F16>(o, os, x, xs, w, rows, hidden, eps);
}

void rms_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                  double epsilon) {
  check_rms_norm(out, input, weight);
  const int64_t hidden = input.size(-1);
  const auto x = input.reshape({-1, hidden});
  auto o = out.view({-1, hidden});
  TORCH_CHECK(x.stride(-1) == 1 && o.stride(-1) == 1 && weight.is_contiguous(),
              "rms_norm: input, out and weight need a unit stride on the hidden dimension, got "
              "strides ", input.strides(), ", ", out.strides(), ", ", weight.strides());
  const int64_t rows = x.size(0), xs = x.stride(0), os = o.stride(0);
  const float eps = float(epsilon);
  const auto dtype = input.scalar_type();
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t b, int64_t e) {
    if (dtype == at::kFloat) {
      rms_norm_f32(o.data_ptr<float>() + b * os, os, x.const_data_ptr<float>() + b * xs, xs,
                   weight.const_data_ptr<float>(), e - b, hidden, eps);
    } else {
      auto* op = static_cast<uint16_t*>(o.data_ptr()) + b * os;
      auto* xp = static_cast<const uint16_t*>(x.const_data_ptr()) + b * xs;
      auto* wp = static_cast<const uint16_t*>(weight.const_data_ptr());
      if (dtype == at::kBFloat16) rms_norm_bf16(op, os, xp, xs, wp, e - b, hidden, eps);
      else rms_norm_f16(op, os, xp, xs, wp, e - b, hidden, eps);
    }
  });
}

// ---- silu_and_mul ---------------------------------------------------------------------------
// out = round(silu(gate)) * up over input = [gate | up], as transformers' `act_fn(gate) * up`
// in the model dtype (silu's result is rounded before the product).
template <class T>
OPDISAGG_INLINE void silu_and_mul_rows(typename T::raw* out, int64_t out_stride,
                                       const typename T::raw* x, int64_t x_stride, int64_t rows,
                                       int64_t d) {
  const int64_t vec_end = d & ~int64_t{31};
  for (int64_t r = 0; r < rows; ++r) {
    const typename T::raw* g = x + r * x_stride;
    const typename T::raw* u = g + d;
    typename T::raw* o = out + r * out_stride;
    for (int64_t i = 0; i < vec_end; i += 32) {
      v16 ga, gb, ua, ub;
      T::vload2(g + i, ga, gb);
      T::vload2(u + i, ua, ub);
      T::vstore2(o + i, vround_to<T>(ga / (1.0f + vexp(-ga))) * ua, vround_to<T>(gb / (1.0f + vexp(-gb))) * ub);
    }
    for (int64_t i = vec_end; i < d; ++i) {
      const float gv = T::load(g[i]);
      o[i] = T::store(round_to<T>(gv / (1.0f + exp_approx(-gv))) * T::load(u[i]));
    }
  }
}

OPDISAGG_EW_CLONES void silu_and_mul_f32(float* o, int64_t os, const float* x, int64_t xs,
                                         int64_t rows, int64_t d) {
  silu_and_mul_rows<F32>(o, os, x, xs, rows, d);
}
OPDISAGG_EW_CLONES void silu_and_mul_bf16(uint16_t* o, int64_t os, const uint16_t* x, int64_t xs,
                                          int64_t rows, int64_t d) {
  silu_and_mul_rows<BF16>(o, os, x, xs, rows, d);
}
OPDISAGG_EW_CLONES void silu_and_mul_f16(uint16_t* o, int64_t os, const uint16_t* x, int64_t xs,
                                         int64_t rows, int64_t d) {
  silu_and_mul_rows<F16>(o, os, x, xs, rows, d);
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  check_silu_and_mul(out, input);
  const int64_t d = out.size(-1);
  const auto x = input.reshape({-1, 2 * d});
  auto o = out.view({-1, d});
  TORCH_CHECK(x.stride(-1) == 1 && o.stride(-1) == 1,
              "silu_and_mul: input and out need a unit stride on the last dimension, got strides ",
              input.strides(), ", ", out.strides());
  const int64_t rows = x.size(0), xs = x.stride(0), os = o.stride(0);
  const auto dtype = input.scalar_type();
  at::parallel_for(0, rows, row_grain(3 * d), [&](int64_t b, int64_t e) {
    if (dtype == at::kFloat) {
      silu_and_mul_f32(o.data_ptr<float>() + b * os, os, x.const_data_ptr<float>() + b * xs, xs,
                       e - b, d);
    } else {
      auto* op = static_cast<uint16_t*>(o.data_ptr()) + b * os;
      auto* xp = static_cast<const uint16_t*>(x.const_data_ptr()) + b * xs;
      if (dtype == at::kBFloat16) silu_and_mul_bf16(op, os, xp, xs, e - b, d);
      else silu_and_mul_f16(op, os, xp, xs, e - b, d);
    }
  });
}

// ---- rotary_embedding -----------------------------------------------------------------------
// In place on query [T, H, D] and key [T, KVH, D]: the first rot = cos_sin_cache.size(1) dims of
// each head rotate by the angle table row of the token's position (float32, [cos | sin] halves).
// Neox style pairs dims (i, i + rot/2) (Llama's rotate_half); GPT-J style pairs (2i, 2i + 1).
// One rounding per element (transformers rounds q*cos and rotate_half(q)*sin separately in bf16).
struct RopeArgs {
  const int64_t* pos;
  const float* table;
  int64_t rot;
  bool neox;
};

template <class T>
OPDISAGG_INLINE void rope_heads(const RopeArgs& a, typename T::raw* x, int64_t t_stride,
                                int64_t h_stride, int64_t heads, int64_t t0, int64_t t1) {
  const int64_t half = a.rot / 2;
  for (int64_t t = t0; t < t1; ++t) {
    const float* cos = a.table + a.pos[t] * a.rot;
    const float* sin = cos + half;
    for (int64_t h = 0; h < heads; ++h) {
      typename T::raw* v = x + t * t_stride + h * h_stride;
      const int64_t step = a.neox ? 1 : 2, other = a.neox ? half : 1;
      int64_t i = 0;
      if (a.neox) {  // the halves are contiguous: 16 pairs per step
        for (; i + 16 <= half; i += 16) {
          const v16 x1 = T::vload(v + i), x2 = T::vload(v + half + i);
          const v16 c = F32::vload(cos + i), sn = F32::vload(sin + i);
          T::vstore(v + i, x1 * c - x2 * sn);
          T::vstore(v + half + i, x2 * c + x1 * sn);
        }
      }
      for (; i < half; ++i) {
        typename T::raw* p1 = v + i * step;
        typename T::raw* p2 = p1 + other;
        const float x1 = T::load(*p1), x2 = T::load(*p2);
        *p1 = T::store(x1 * cos[i] - x2 * sin[i]);
        *p2 = T::store(x2 * cos[i] + x1 * sin[i]);
      }
    }
  }
}

OPDISAGG_EW_CLONES void rope_f32(const RopeArgs& a, float* x, int64_t ts, int64_t hs, int64_t heads,
                                 int64_t t0, int64_t t1) {
  rope_heads<F32>(a, x, ts, hs, heads, t0, t1);
}
OPDISAGG_EW_CLONES void rope_bf16(const RopeArgs& a, uint16_t* x, int64_t ts, int64_t hs,
                                  int64_t heads, int64_t t0, int64_t t1) {
  rope_heads<BF16>(a, x, ts, hs, heads, t0, t1);
}
OPDISAGG_EW_CLONES void rope_f16(const RopeArgs& a, uint16_t* x, int64_t ts, int64_t hs,
                                 int64_t heads, int64_t t0, int64_t t1) {
  rope_heads<F16>(a, x, ts, hs, heads, t0, t1);
}

void rope_tensor(const RopeArgs& a, at::Tensor& x, int64_t t0, int64_t t1) {
  const int64_t ts = x.stride(0), hs = x.stride(1), heads = x.size(1);
  switch (x.scalar_type()) {
    case at::kFloat: rope_f32(a, x.data_ptr<float>(), ts, hs, heads, t0, t1); break;
    case at::kBFloat16: rope_bf16(a, static_cast<uint16_t*>(x.data_ptr()), ts, hs, heads, t0, t1); break;
    default: rope_f16(a, static_cast<uint16_t*>(x.data_ptr()), ts, hs, heads, t0, t1); break;
  }
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          const at::Tensor& cos_sin_cache, bool is_neox) {
  check_rotary_embedding(positions, query, key, cos_sin_cache);
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1,
              "rotary_embedding: query and key need a unit stride on head_dim, got strides ",
              query.strides(), ", ", key.strides());
  check_contiguous(cos_sin_cache, "rotary_embedding", "cos_sin_cache");
  const auto pos = positions.contiguous();
  check_ids_in_range(pos, 0, cos_sin_cache.size(0), "rotary_embedding", "positions",
                     "(cos_sin_cache rows = max_position)");
  const RopeArgs a{pos.const_data_ptr<int64_t>(), cos_sin_cache.const_data_ptr<float>(),
                   cos_sin_cache.size(1), is_neox};
  const int64_t T = query.size(0);
  const int64_t per_token = (query.size(1) + key.size(1)) * a.rot;
  at::parallel_for(0, T, row_grain(per_token), [&](int64_t b, int64_t e) {
    rope_tensor(a, query, b, e);
    rope_tensor(a, key, b, e);
  });
}

}  // namespace
}  // namespace opdisagg

TORCH_LIBRARY_IMPL(opdisagg, CPU, m) {
  m.impl("rms_norm", &opdisagg::rms_norm_cpu);
  m.impl("silu_and_mul", &opdisagg::silu_and_mul_cpu);
  m.impl("rotary_embedding", &opdisagg::rotary_embedding_cpu);
}
