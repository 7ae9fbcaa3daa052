// CPU kernel of paged_attention: attention of query rows over the paged KV caches (the decode
// and prefill hot path on CPU). See the schema comment in torch_bindings.cpp for the semantics.
//
// Decode rows (n_r == 1) in bf16 with head_dim 64/128 on CPUs with AVX512-BF16 take a
// specialized path (decode_bf16 below: one work item per request covering all its kv heads);
// everything else, and every row on other CPUs, takes the generic path described here.
//
// Work item = (request, kv head, chunk of query rows). An item loads every K/V row it needs once,
// converts it to float32 into a small tile buffer, and serves the whole GQA group of query heads
// (and all rows of the chunk) from it. Softmax is online (flash-style) over tiles of kTileKeys
// keys, so scratch memory does not grow with the context; everything accumulates in float32.
//
// Vectorization: the build is baseline x86-64 (-O3, SSE2), so the hot function is compiled in
// several ISA variants with GCC function multiversioning (target_clones: x86-64-v4 = AVX-512,
// v3 = AVX2+FMA, baseline) and picked at load time by CPUID. The math uses GCC vector extensions
// of 16 floats (one zmm on AVX-512; split into ymm/xmm by the other clones): QK as 16 keys x
// head_dim accumulators reduced with one transpose-add tree, PV with 4 independent FMA chains,
// a polynomial exp, and software prefetch of the next tile's K/V rows (blocks are scattered).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define OPDISAGG_PA_X86 1
#endif

#include "../ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OPDISAGG_PA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OPDISAGG_PA_CLONES
#endif
#define OPDISAGG_INLINE inline __attribute__((always_inline))

namespace opdisagg {
namespace {

constexpr const char* kOp = "paged_attention";
// Keys per online-softmax step: a K and a V tile of 64 x head_dim floats stay in L1 (32 KiB at
// head_dim 64) and the per-step rescale of the accumulators is amortized over 64 keys.
constexpr int64_t kTileKeys = 64;
// Query vectors (rows x heads of one GQA group) per work item: enough to amortize loading and
// converting the K/V tiles, small enough that a long prefill splits into many items.
constexpr int64_t kTargetQueryVectors = 16;
// Below this many multiply-adds (QK plus PV) the call runs on the calling thread: waking the
// OpenMP pool costs a few microseconds.
constexpr int64_t kSerialMacs = int64_t{1} << 17;

enum class Kind { F32, BF16, F16 };

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

// Branchless fp16 -> fp32 (the FP16 library's algorithm, which c10 also uses), written so the
// autovectorizer turns it into selects; handles normals, subnormals, inf and NaN.
OPDISAGG_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized);
  return f32_from_bits(sign | bits);
}

template <Kind K>
struct Traits;
template <>
struct Traits<Kind::F32> {
  using raw = float;
  static OPDISAGG_INLINE float load(float x) { return x; }
  static OPDISAGG_INLINE float store(float x) { return x; }
};
template <>
struct Traits<Kind::BF16> {
  using raw = uint16_t;
  static OPDISAGG_INLINE float load(uint16_t x) { return f32_from_bits(uint32_t(x) << 16); }
  static OPDISAGG_INLINE uint16_t store(float x) { return c10::BFloat16(x).x; }  // RNE
};
template <>
struct Traits<Kind::F16> {
  using raw = uint16_t;
  static OPDISAGG_INLINE float load(uint16_t x) { return f16_to_f32(x); }
  static OPDISAGG_INLINE uint16_t store(float x) { return c10::Half(x).x; }
};

struct Ctx {
  const void* q;
  int64_t q_s0, q_s1;  // element strides of query rows / heads
  void* out;
  int64_t o_s0, o_s1;
  const void* kc;
  const void* vc;
  int64_t kv_heads, head_dim, block_size, group, max_blocks;
  const int64_t* block_tables;
  const int64_t* qsl;
  const int64_t* seq_lens;
  float scale;
  int64_t window;
  const float* sinks;  // [H] or nullptr
  // Decode fast path (items with g < 0: the single query row of request r, all kv heads).
  void (*decode)(const struct Ctx&, int64_t r);
};

// Query rows [j0, j1) of request r, kv head g (g < 0: a decode row served by Ctx::decode).
struct Item {
  int64_t r, g, j0, j1, cost;
};

template <Kind K>
OPDISAGG_INLINE void to_float(const typename Traits<K>::raw* __restrict src, float* __restrict dst,
                              int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Traits<K>::load(src[i]);
}

// 16 floats: one zmm in the AVX-512 clone, two ymm / four xmm in the others. Buffers use rows of
// Dp = head_dim rounded up to 16 floats with zero padding, so every loop works on whole vectors.
typedef float v16 __attribute__((vector_size(64)));
OPDISAGG_INLINE v16 vload(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
OPDISAGG_INLINE void vstore(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// One level of the transpose-reduce: folds the halves of each 2w-lane block of a and b.
template <int W>
OPDISAGG_INLINE v16 fold(v16 a, v16 b) {
  if constexpr (W == 8) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  } else if constexpr (W == 4) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  } else if constexpr (W == 2) {
    return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  } else {
    return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
}

// Horizontal sums of 16 vectors in one vector: lane i = sum of x[i]'s lanes. Fed in
// bit-reversed order, the four fold levels leave the sums in natural order (30 shuffles for 16
// sums instead of 4 per sum).
OPDISAGG_INLINE v16 hsum16(const v16* x) {
  const v16 y0 = fold<8>(x[0], x[8]), y1 = fold<8>(x[4], x[12]), y2 = fold<8>(x[2], x[10]),
            y3 = fold<8>(x[6], x[14]), y4 = fold<8>(x[1], x[9]), y5 = fold<8>(x[5], x[13]),
            y6 = fold<8>(x[3], x[11]), y7 = fold<8>(x[7], x[15]);
  const v16 z0 = fold<4>(y0, y1), z1 = fold<4>(y2, y3), z2 = fold<4>(y4, y5), z3 = fold<4>(y6, y7);
  return fold<1>(fold<2>(z0, z1), fold<2>(z2, z3));
}

typedef int32_t v16i __attribute__((vector_size(64)));

// exp(x) for x <= 0, 16 lanes: Cephes' expf polynomial on x = k ln2 + r, |r| <= ln2/2, scaled
// by 2^k through the exponent bits; relative error ~2e-7, and exactly 0 below -87 (so -inf
// padding lanes give 0). Inputs are scores minus their running max.
OPDISAGG_INLINE v16 vexp_nonpos(v16 x) {
  const v16 lo = v16{} - 87.0f;
  const v16 xc = x < lo ? lo : x;
  const v16 k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const v16 r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 y = p * r * r + r + 1.0f;
  const v16i e = (__builtin_convertvector(k, v16i) + 127) << 23;
  const v16 res = y * __builtin_bit_cast(v16, e);
  return x < lo ? v16{} : res;
}

// s[t] = q . k[t] for the 16-key groups covering [a, b) (group starts are multiples of 16 and
// end <= kTileKeys, so lanes outside [a, b) compute throwaway values from the tile buffer).
OPDISAGG_INLINE void dot_rows(const float* __restrict q, const float* __restrict k, int64_t Dp,
                              int64_t a, int64_t b, float* __restrict s) {
  for (int64_t t = a & ~int64_t{15}; t < b; t += 16) {
    v16 x[16];
    for (int i = 0; i < 16; ++i) x[i] = v16{};
    const float* kt = k + t * Dp;
    for (int64_t c = 0; c < Dp; c += 16) {
      const v16 qv = vload(q + c);
      for (int i = 0; i < 16; ++i) x[i] += qv * vload(kt + i * Dp + c);
    }
    vstore(s + t, hsum16(x));
  }
}

// acc += sum_{t in [a, b)} p[t] * v[t]; four accumulators per 16-float chunk (independent
// FMA chains), acc loaded and stored once per chunk.
OPDISAGG_INLINE void accumulate_rows(const float* __restrict p, const float* __restrict v,
                                     int64_t Dp, int64_t a, int64_t b, float* __restrict acc) {
  for (int64_t c = 0; c < Dp; c += 16) {
    v16 a0 = vload(acc + c), a1{}, a2{}, a3{};
    const float* vc = v + c;
    int64_t t = a;
    for (; t + 4 <= b; t += 4) {
      a0 += p[t] * vload(vc + t * Dp);
      a1 += p[t + 1] * vload(vc + (t + 1) * Dp);
      a2 += p[t + 2] * vload(vc + (t + 2) * Dp);
      a3 += p[t + 3] * vload(vc + (t + 3) * Dp);
    }
    for (; t < b; ++t) a0 += p[t] * vload(vc + t * Dp);
    vstore(acc + c, (a0 + a1) + (a2 + a3));
  }
}

template <Kind K>
OPDISAGG_INLINE void run_items_impl(const Ctx& c, const Item* items, int64_t n_items,
                                    std::atomic<int64_t>* next) {
  using raw = typename Traits<K>::raw;
  const int64_t D = c.head_dim, G = c.group;
  const int64_t Dp = (D + 15) & ~int64_t{15};
  int64_t max_rows = 0;
  for (int64_t i = 0; i < n_items; ++i) max_rows = std::max(max_rows, items[i].j1 - items[i].j0);
  const int64_t max_qr = max_rows * G;
  // One zeroed allocation per thread per call (the padding lanes of every row stay 0):
  // q / acc [max_qr, Dp], K / V tiles [kTileKeys, Dp], scores [kTileKeys], max / sum [max_qr].
  std::vector<float> buf(2 * max_qr * Dp + 2 * kTileKeys * Dp + kTileKeys + 2 * max_qr);
  float* qf = buf.data();
  float* acc = qf + max_qr * Dp;
  float* kf = acc + max_qr * Dp;
  float* vf = kf + kTileKeys * Dp;
  float* sc = vf + kTileKeys * Dp;
  float* mx = sc + kTileKeys;
  float* lsum = mx + max_qr;
  std::vector<int64_t> lo(max_rows), hi(max_rows);
  int64_t offs[2][kTileKeys];  // cache offsets of the current and the next tile's rows

  const raw* q = static_cast<const raw*>(c.q);
  raw* out = static_cast<raw*>(c.out);
  const raw* kc = static_cast<const raw*>(c.kc);
  const raw* vc = static_cast<const raw*>(c.vc);
  const int64_t slot_stride = c.kv_heads * D;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(raw));
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  for (int64_t i = next->fetch_add(1, std::memory_order_relaxed); i < n_items;
       i = next->fetch_add(1, std::memory_order_relaxed)) {
    const Item& it = items[i];
    if (it.g < 0) {
      c.decode(c, it.r);
      continue;
    }
    const int64_t M = it.j1 - it.j0, QR = M * G;
    const int64_t start = c.qsl[it.r];
    const int64_t n_r = c.qsl[it.r + 1] - start;
    const int64_t p0 = c.seq_lens[it.r] - n_r;  // position of the request's first query row
    const int64_t* bt = c.block_tables + it.r * c.max_blocks;
    // Offsets of keys [t0, t1) into offs[which], and a prefetch of their K/V rows: the rows
    // of random blocks come from L3/DRAM, so the next tile's loads overlap this tile's math.
    auto map_tile = [&](int64_t t0, int64_t t1, int which) {
      int64_t blk = t0 / c.block_size, in_blk = t0 % c.block_size;  // one division per tile
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t off = (bt[blk] * c.block_size + in_blk) * slot_stride + it.g * D;
        if (++in_blk == c.block_size) in_blk = 0, ++blk;
        offs[which][t - t0] = off;
        for (int64_t bidx = 0; bidx < row_bytes; bidx += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(kc + off) + bidx);
          __builtin_prefetch(reinterpret_cast<const char*>(vc + off) + bidx);
        }
      }
    };

    for (int64_t m = 0; m < M; ++m) {
      const int64_t row = start + it.j0 + m, pos = p0 + it.j0 + m;
      hi[m] = pos;
      lo[m] = c.window > 0 ? std::max<int64_t>(0, pos - c.window + 1) : 0;
      for (int64_t h = 0; h < G; ++h) {
        const raw* src = q + row * c.q_s0 + (it.g * G + h) * c.q_s1;
        float* dst = qf + (m * G + h) * Dp;
        for (int64_t d = 0; d < D; ++d) dst[d] = Traits<K>::load(src[d]) * c.scale;
      }
    }
    std::fill(acc, acc + QR * Dp, 0.f);
    std::fill(mx, mx + QR, kNegInf);
    std::fill(lsum, lsum + QR, 0.f);

    const int64_t k_end = hi[M - 1] + 1;
    int cur = 0;
    map_tile(lo[0], std::min(lo[0] + kTileKeys, k_end), cur);
    for (int64_t t0 = lo[0]; t0 < k_end; t0 += kTileKeys, cur ^= 1) {
      const int64_t t1 = std::min(t0 + kTileKeys, k_end);
      if (t1 < k_end) map_tile(t1, std::min(t1 + kTileKeys, k_end), cur ^ 1);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t off = offs[cur][t - t0];
        to_float<K>(kc + off, kf + (t - t0) * Dp, D);
        to_float<K>(vc + off, vf + (t - t0) * Dp, D);
      }
      for (int64_t m = 0; m < M; ++m) {
        const int64_t a = std::max(lo[m], t0) - t0, b = std::min(hi[m] + 1, t1) - t0;
        if (a >= b) continue;  // this row sees no key of the tile
        for (int64_t h = 0; h < G; ++h) {
          const int64_t qi = m * G + h;
          dot_rows(qf + qi * Dp, kf, Dp, a, b, sc);
          // Whole 16-key groups from here on; lanes outside [a, b) become -inf, then exp 0.
          const int64_t ga = a & ~int64_t{15}, gb = (b + 15) & ~int64_t{15};
          for (int64_t t = ga; t < a; ++t) sc[t] = kNegInf;
          for (int64_t t = b; t < gb; ++t) sc[t] = kNegInf;
          v16 vmax = v16{} + kNegInf;
          for (int64_t t = ga; t < gb; t += 16) {
            const v16 x = vload(sc + t);
            vmax = x > vmax ? x : vmax;
          }
          float tmax = kNegInf;
          for (int l = 0; l < 16; ++l) tmax = std::max(tmax, vmax[l]);
          const float m_old = mx[qi];
          const float m_new = std::max(m_old, tmax);
          const float alpha = m_old == kNegInf ? 0.f : std::exp(m_old - m_new);
          v16 vsum{};
          for (int64_t t = ga; t < gb; t += 16) {
            const v16 e = vexp_nonpos(vload(sc + t) - m_new);
            vstore(sc + t, e);
            vsum += e;
          }
          float sum = 0.f;
          for (int l = 0; l < 16; ++l) sum += vsum[l];
          lsum[qi] = lsum[qi] * alpha + sum;
          mx[qi] = m_new;
          float* av = acc + qi * Dp;
          if (alpha != 1.f)
            for (int64_t d = 0; d < Dp; ++d) av[d] *= alpha;
          accumulate_rows(sc, vf, Dp, a, b, av);
        }
      }
    }

    for (int64_t m = 0; m < M; ++m) {
      const int64_t row = start + it.j0 + m;
      for (int64_t h = 0; h < G; ++h) {
        const int64_t qi = m * G + h, head = it.g * G + h;
        // Every row sees at least its own key, so lsum >= 1 and mx is finite here.
        float norm = 1.f / lsum[qi];
        if (c.sinks != nullptr) {
          const float s = c.sinks[head];
          const float m_all = std::max(mx[qi], s);
          const float corr = std::exp(mx[qi] - m_all);
          norm = corr / (lsum[qi] * corr + std::exp(s - m_all));
        }
        const float* av = acc + qi * Dp;
        raw* dst = out + row * c.o_s0 + head * c.o_s1;
        for (int64_t d = 0; d < D; ++d) dst[d] = Traits<K>::store(av[d] * norm);
      }
    }
  }
}

// The multiversioned entry points, one per dtype (target_clones on templates is fragile in GCC).
OPDISAGG_PA_CLONES void run_items_f32(const Ctx& c, const Item* items, int64_t n,
                                      std::atomic<int64_t>* next) {
  run_items_impl<Kind::F32>(c, items, n, next);
}
OPDISAGG_PA_CLONES void run_items_bf16(const Ctx& c, const Item* items, int64_t n,
                                       std::atomic<int64_t>* next) {
  run_items_impl<Kind::BF16>(c, items, n, next);
}
OPDISAGG_PA_CLONES void run_items_f16(const Ctx& c, const Item* items, int64_t n,
                                      std::atomic<int64_t>* next) {
  run_items_impl<Kind::F16>(c, items, n, next);
}

// ---- Decode fast path: bf16 caches, one query row, AVX512-BF16 ------------------------------
//
// One work item = one decode request, all of its kv heads: a slot's K (or V) rows of every kv
// head are contiguous (kv_heads x head_dim bf16), so streaming over the request's keys slot by
// slot loads each cache line exactly once. Two passes over the keys (the context of a decode
// row is bounded, see kDecodeMaxScores): (1) scores of every query head for 16 keys at a time,
// q.k with _mm512_dpbf16_ps straight on the bf16 data (the bf16 products are exact in fp32 and
// accumulate in fp32) and one transpose-add tree for the 16 sums; (2) exact softmax per head
// (polynomial exp); (3) P.V in fp32 FMAs, V widened from bf16 by a shift, the accumulators of a
// tile of heads kept in registers over 16 keys. Software prefetch of the next 16 keys' slots.
// Scores buffer bound (floats, heads x padded keys) of the fast path; longer contexts take the
// generic (online softmax) path.
constexpr int64_t kDecodeMaxScores = int64_t{1} << 20;

#if defined(OPDISAGG_PA_X86)
#define OPDISAGG_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")))

struct DecodeScratch {
  std::vector<int64_t> offs;  // element offset of each key's slot (kv head 0)
  std::vector<float> sc;      // [H, Lp] scores, then probabilities
  std::vector<float> acc;     // [H, D]
};
thread_local DecodeScratch tl_decode;

OPDISAGG_BF16_TARGET OPDISAGG_INLINE __m512 bf16_lo(__m512i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(x)), 16));
}
OPDISAGG_BF16_TARGET OPDISAGG_INLINE __m512 bf16_hi(__m512i x) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1)), 16));
}

// Software prefetch of the cache lines of a run of key slots (scattered blocks), issued a few
// lines at a time between the math so the requests spread out instead of filling the line fill
// buffers in one burst.
struct PrefetchStream {
  const char* base;
  const int64_t* offs;  // element (bf16) offsets of the slots
  int64_t n_slots, lines_per_slot, slot, line;
  OPDISAGG_INLINE void reset(const uint16_t* b, const int64_t* o, int64_t n, int64_t lps) {
    base = reinterpret_cast<const char*>(b);
    offs = o;
    lines_per_slot = lps;
    n_slots = n;
    slot = 0;
    line = 0;
  }
  OPDISAGG_INLINE void issue(int64_t k) {
    for (; k > 0 && slot < n_slots; --k) {
      __builtin_prefetch(base + offs[slot] * 2 + line * 64);
      if (++line == lines_per_slot) line = 0, ++slot;
    }
  }
  OPDISAGG_INLINE void drain() { issue(std::numeric_limits<int64_t>::max()); }
};

// acc[j] (NH heads, D floats each, stride D) += sum_{i < n} p[j * ps + i] * v[offs[i] + goff].
template <int D, int NH>
OPDISAGG_BF16_TARGET void pv_tile(const uint16_t* __restrict vc, const int64_t* __restrict offs,
                                  int64_t n, int64_t goff, const float* __restrict p, int64_t ps,
                                  float* __restrict acc, PrefetchStream& pf, int64_t pf_per_key) {
  constexpr int NB = D / 32, NF = D / 16;
  __m512 a[NH][NF];
  for (int j = 0; j < NH; ++j)
    for (int f = 0; f < NF; ++f) a[j][f] = _mm512_loadu_ps(acc + j * D + 16 * f);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* vp = vc + offs[i] + goff;
    pf.issue(pf_per_key);
    __m512 v[NF];
    for (int b = 0; b < NB; ++b) {
      const __m512i x = _mm512_loadu_si512(vp + 32 * b);
      v[2 * b] = bf16_lo(x);
      v[2 * b + 1] = bf16_hi(x);
    }
    for (int j = 0; j < NH; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j * ps + i]);
      for (int f = 0; f < NF; ++f) a[j][f] = _mm512_fmadd_ps(pj, v[f], a[j][f]);
    }
  }
  for (int j = 0; j < NH; ++j)
    for (int f = 0; f < NF; ++f) _mm512_storeu_ps(acc + j * D + 16 * f, a[j][f]);
}

template <int D>
OPDISAGG_BF16_TARGET void decode_bf16(const Ctx& c, int64_t r) {
  constexpr int NB = D / 32;
  constexpr int kMaxNH = D <= 64 ? 4 : 2;  // register budget of the P.V accumulators
  const int64_t KVH = c.kv_heads, G = c.group, H = KVH * G, bs = c.block_size;
  const int64_t row = c.qsl[r];
  const int64_t pos = c.seq_lens[r] - 1;
  const int64_t lo = c.window > 0 ? std::max<int64_t>(0, pos - c.window + 1) : 0;
  const int64_t L = pos + 1 - lo, Lp = (L + 15) & ~int64_t{15};
  const int64_t slot_stride = KVH * D;
  const int64_t slot_bytes = slot_stride * 2;
  DecodeScratch& s = tl_decode;
  if (static_cast<int64_t>(s.offs.size()) < Lp + 16) s.offs.resize(Lp + 16);
  if (static_cast<int64_t>(s.sc.size()) < H * Lp) s.sc.resize(H * Lp);
  if (static_cast<int64_t>(s.acc.size()) < H * D) s.acc.resize(H * D);
  int64_t* offs = s.offs.data();
  float* sc = s.sc.data();
  float* acc = s.acc.data();

  const int64_t* bt = c.block_tables + r * c.max_blocks;
  {
    int64_t blk = lo / bs, in_blk = lo % bs;
    for (int64_t t = 0; t < L; ++t) {
      offs[t] = (bt[blk] * bs + in_blk) * slot_stride;
      if (++in_blk == bs) in_blk = 0, ++blk;
    }
    // Padding keys (masked) read the last real key's slot.
    for (int64_t t = L; t < Lp + 16; ++t) offs[t] = offs[L - 1];
  }
  const uint16_t* q = static_cast<const uint16_t*>(c.q) + row * c.q_s0;
  const uint16_t* kc = static_cast<const uint16_t*>(c.kc);
  const uint16_t* vc = static_cast<const uint16_t*>(c.vc);
  const __m512 vscale = _mm512_set1_ps(c.scale);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());

  const int64_t lps = (slot_bytes + 63) / 64;
  constexpr bool pfm = true;
  constexpr int64_t pf_dist = 16;  // keys ahead (one block at block_size 16)
  PrefetchStream pf;
  // (1) scores
  if (pfm) {
    pf.reset(kc, offs, std::min<int64_t>(pf_dist, L), lps);
    pf.drain();
  }
  const int64_t per_key_k = (lps + H - 1) / H;  // lines of the prefetch per key and head
  for (int64_t t0 = 0; t0 < Lp; t0 += 16) {
    if (pfm) {
      const int64_t a = t0 + pf_dist;
      pf.reset(kc, offs + a, std::max<int64_t>(0, std::min<int64_t>(16, L - a)), lps);
    }
    const __mmask16 valid =
        L - t0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (L - t0)) - 1);
    const int64_t* o = offs + t0;
    for (int64_t g = 0; g < KVH; ++g) {
      const uint16_t* kg = kc + g * D;
      for (int64_t h = 0; h < G; ++h) {
        const int64_t hq = g * G + h;
        const uint16_t* qh = q + hq * c.q_s1;

        __m512bh qa[NB];
        for (int b = 0; b < NB; ++b) qa[b] = (__m512bh)_mm512_loadu_si512(qh + 32 * b);
        v16 x[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          const uint16_t* kp = kg + o[i];
          if (pfm) pf.issue(per_key_k);
          __m512 a = _mm512_setzero_ps();
          for (int b = 0; b < NB; ++b)
            a = _mm512_dpbf16_ps(a, qa[b], (__m512bh)_mm512_loadu_si512(kp + 32 * b));
          x[i] = (v16)a;
        }
        const __m512 sum = _mm512_mul_ps((__m512)hsum16(x), vscale);
        _mm512_storeu_ps(sc + hq * Lp + t0, _mm512_mask_blend_ps(valid, ninf, sum));
      }
    }
    if (pfm) pf.drain();
  }
  // Start the V stream while the softmax runs.
  if (pfm) {
    pf.reset(vc, offs, std::min<int64_t>(pf_dist, L), lps);
    pf.drain();
  }

  // (2) softmax per head (unnormalized; the norm is applied to the output)
  float norm[256];
  float* normp = H <= 256 ? norm : nullptr;
  std::vector<float> norm_big;
  if (normp == nullptr) {
    norm_big.resize(H);
    normp = norm_big.data();
  }
  for (int64_t hq = 0; hq < H; ++hq) {
    float* sh = sc + hq * Lp;
    __m512 vm = ninf;
    for (int64_t t = 0; t < Lp; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(sh + t));
    const float m = _mm512_reduce_max_ps(vm);
    const v16 mv = v16{} + m;
    v16 vs{};
    for (int64_t t = 0; t < Lp; t += 16) {
      const v16 e = vexp_nonpos(vload(sh + t) - mv);
      vstore(sh + t, e);
      vs += e;
    }
    const float sum = _mm512_reduce_add_ps((__m512)vs);
    float nrm = 1.f / sum;
    if (c.sinks != nullptr) {
      const float sk = c.sinks[hq];
      const float m_all = std::max(m, sk);
      const float corr = std::exp(m - m_all);
      nrm = corr / (sum * corr + std::exp(sk - m_all));
    }
    normp[hq] = nrm;
  }

  // (3) P.V
  const int64_t v_steps = KVH * ((G + kMaxNH - 1) / kMaxNH);
  const int64_t per_key_v = (lps + v_steps - 1) / v_steps;
  std::fill(acc, acc + H * D, 0.f);
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, L - t0);
    if (pfm) {
      const int64_t a = t0 + pf_dist;
      pf.reset(vc, offs + a, std::max<int64_t>(0, std::min<int64_t>(16, L - a)), lps);
    }
    for (int64_t g = 0; g < KVH; ++g) {
      for (int64_t h0 = 0; h0 < G; h0 += kMaxNH) {

        const int64_t nh = std::min<int64_t>(kMaxNH, G - h0), hq0 = g * G + h0;
        const float* p = sc + hq0 * Lp + t0;
        float* a = acc + hq0 * D;
        switch (nh) {
          case 1: pv_tile<D, 1>(vc, offs + t0, n, g * D, p, Lp, a, pf, per_key_v); break;
          case 2: pv_tile<D, 2>(vc, offs + t0, n, g * D, p, Lp, a, pf, per_key_v); break;
          case 3: pv_tile<D, 3>(vc, offs + t0, n, g * D, p, Lp, a, pf, per_key_v); break;
          default: pv_tile<D, kMaxNH>(vc, offs + t0, n, g * D, p, Lp, a, pf, per_key_v); break;
        }
      }
    }
    if (pfm) pf.drain();
  }
  uint16_t* out = static_cast<uint16_t*>(c.out) + row * c.o_s0;
  for (int64_t hq = 0; hq < H; ++hq) {
    uint16_t* dst = out + hq * c.o_s1;
    const float* av = acc + hq * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = Traits<Kind::BF16>::store(av[d] * normp[hq]);
  }
}

bool cpu_has_avx512bf16() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}
#endif  // OPDISAGG_PA_X86

// The fast decode kernel for these shapes, or nullptr (then every row takes the generic path).
// OPDISAGG_PA_DECODE_FAST=0 in the environment disables it (benchmarks, debugging).
void (*select_decode(at::ScalarType dtype, int64_t D))(const Ctx&, int64_t) {
#if defined(OPDISAGG_PA_X86)
  static const bool enabled = [] {
    const char* e = std::getenv("OPDISAGG_PA_DECODE_FAST");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  if (!enabled || dtype != at::kBFloat16 || !cpu_has_avx512bf16()) return nullptr;
  if (D == 64) return &decode_bf16<64>;
  if (D == 128) return &decode_bf16<128>;
#else
  (void)dtype;
  (void)D;
#endif
  return nullptr;
}

// Data checks on the CPU index tensors (contiguous int64), serial and before any write.
void check_paged_attention_indices(const int64_t* qsl, const int64_t* sl, const int64_t* bt,
                                   int64_t R, int64_t max_blocks, int64_t T, int64_t num_blocks,
                                   int64_t block_size, int64_t window) {
  TORCH_CHECK(qsl[0] >= 0, kOp, ": query_start_loc[0] = ", qsl[0], " must be >= 0");
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(qsl[r + 1] >= qsl[r], kOp, ": query_start_loc must be non-decreasing, got query_start_loc[",
                r, "] = ", qsl[r], " > query_start_loc[", r + 1, "] = ", qsl[r + 1]);
  }
  TORCH_CHECK(qsl[R] <= T, kOp, ": query_start_loc[", R, "] = ", qsl[R],
              " exceeds the number of query rows ", T);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = qsl[r + 1] - qsl[r];
    TORCH_CHECK(sl[r] >= n, kOp, ": seq_lens[", r, "] = ", sl[r], " is smaller than the ", n,
                " query rows of request ", r,
                " (seq_lens counts the context including the new tokens)");
    if (n == 0) continue;
    const int64_t first = sl[r] - n;
    const int64_t k_lo = window > 0 ? std::max<int64_t>(0, first - window + 1) : 0;
    const int64_t b_lo = k_lo / block_size, b_hi = (sl[r] - 1) / block_size;
    TORCH_CHECK_INDEX(b_hi < max_blocks, kOp, ": request ", r, " (seq_lens = ", sl[r],
                      ") needs block_tables[", r, ", ", b_hi, "] but block_tables has only ",
                      max_blocks, " columns (block_size ", block_size, ")");
    for (int64_t b = b_lo; b <= b_hi; ++b) {
      const int64_t id = bt[r * max_blocks + b];
      TORCH_CHECK_INDEX(id >= 0 && id < num_blocks, kOp, ": block_tables[", r, ", ", b, "] = ",
                        id, " is out of range [0, ", num_blocks,
                        ") (num_blocks of key_cache); it holds keys ", b * block_size, "..",
                        (b + 1) * block_size - 1, " of request ", r);
    }
  }
}

void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_tables,
                         const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                         double scale, int64_t window, const std::optional<at::Tensor>& sinks) {
  check_paged_attention(out, query, key_cache, value_cache, block_tables, query_start_loc,
                        seq_lens, sinks);
  check_contiguous(key_cache, kOp, "key_cache");
  check_contiguous(value_cache, kOp, "value_cache");
  const int64_t T = query.size(0), H = query.size(1), D = query.size(2);
  TORCH_CHECK(D <= 1 || query.stride(2) == 1, kOp,
              ": query must have a unit stride on head_dim, got strides ", query.strides());
  TORCH_CHECK(D <= 1 || out.stride(2) == 1, kOp,
              ": out must have a unit stride on head_dim, got strides ", out.strides());
  const auto bt = block_tables.contiguous();
  const auto qsl = query_start_loc.contiguous();
  const auto sl = seq_lens.contiguous();
  const int64_t R = bt.size(0), max_blocks = bt.size(1);
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1);
  const int64_t kv_heads = key_cache.size(2);
  const int64_t* qsl_p = qsl.const_data_ptr<int64_t>();
  const int64_t* sl_p = sl.const_data_ptr<int64_t>();
  const int64_t* bt_p = bt.const_data_ptr<int64_t>();
  check_paged_attention_indices(qsl_p, sl_p, bt_p, R, max_blocks, T, num_blocks, block_size,
                                window);
  if (T == 0 || H == 0 || D == 0) return;
  std::optional<at::Tensor> sinks_c;
  if (sinks.has_value()) sinks_c = sinks->contiguous();

  const int64_t G = H / kv_heads;
  const int64_t rows_per_item = std::max<int64_t>(1, kTargetQueryVectors / G);
  const auto decode = select_decode(query.scalar_type(), D);
  std::vector<Item> items;
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = qsl_p[r + 1] - qsl_p[r];
    if (decode != nullptr && n == 1) {
      const int64_t span = window > 0 ? std::min(window, sl_p[r]) : sl_p[r];
      if (H * ((span + 15) & ~int64_t{15}) <= kDecodeMaxScores) {
        const int64_t cost = H * span * D * 2;
        total += cost;
        items.push_back({r, -1, 0, 1, cost});
        continue;
      }
    }
    for (int64_t j0 = 0; j0 < n; j0 += rows_per_item) {
      const int64_t j1 = std::min(n, j0 + rows_per_item);
      // keys the chunk's rows see (all of them for a causal chunk without window)
      const int64_t p_last = sl_p[r] - n + j1 - 1;
      const int64_t span = window > 0 ? std::min(window, p_last + 1) : p_last + 1;
      const int64_t cost = (j1 - j0) * G * span * D * 2;
      total += cost * kv_heads;
      for (int64_t g = 0; g < kv_heads; ++g) items.push_back({r, g, j0, j1, cost});
    }
  }
  if (items.empty()) return;
  // Longest first, handed out dynamically: balances a long prefill against many decodes.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });

  const Ctx ctx{query.const_data_ptr(), query.stride(0), query.stride(1),
                out.data_ptr(), out.stride(0), out.stride(1),
                key_cache.const_data_ptr(), value_cache.const_data_ptr(),
                kv_heads, D, block_size, G, max_blocks,
                bt_p, qsl_p, sl_p,
                static_cast<float>(scale), window,
                sinks_c.has_value() ? sinks_c->const_data_ptr<float>() : nullptr, decode};
  void (*run)(const Ctx&, const Item*, int64_t, std::atomic<int64_t>*) =
      query.scalar_type() == at::kFloat      ? &run_items_f32
      : query.scalar_type() == at::kBFloat16 ? &run_items_bf16
                                             : &run_items_f16;
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  if (workers <= 1 || total < kSerialMacs) {
    run(ctx, items.data(), n_items, &next);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) run(ctx, items.data(), n_items, &next);
  });
}

}  // namespace
}  // namespace opdisagg

TORCH_LIBRARY_IMPL(opdisagg, CPU, m) {
  m.impl("paged_attention", &opdisagg::paged_attention_cpu);
}
