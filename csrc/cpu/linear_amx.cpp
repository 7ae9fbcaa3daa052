// bf16 projections with few rows (decode steps) on Intel AMX: y[M, N] = x[M, K] @ W[N, K]^T.
//
// Why not oneDNN: at small M a projection is a stream over its weight, and oneDNN's per-call
// cost (primitive lookup, scratchpad, an OpenMP region) plus its blocking read the weights at
// well under the machine's bandwidth, on a decode step made of ~120 such calls. Here the weight
// is prepacked once into the byte order the tile loads want, so each thread walks a contiguous
// range of it exactly once while the tile math (16x16 fp32 accumulators, 32 bf16 per step) runs
// far ahead of memory.
//
// The weight is the A operand and the input the B operand (y^T = W x^T): an A tile row is 32
// consecutive inputs of one output column, i.e. exactly one GGUF block with one (d, m), so a
// GGUF row expands through a 16-entry table and one word permute instead of per-weight float
// math (16 rows, one thread: 143 -> 122 ns per k step of Q4_1 weights in one pair of runs; the
// SmolLM2 forward at 16 rows on one thread 7% faster over three pairs, alternating processes).
// Q4_1 columns are packed in pairs that share one table register (see Q4_1Source). The input is
// transposed once per call into B tiles (16 input pairs x 16 rows, each row's pair adjacent), and
// each C tile (16 columns x 16 rows, fp32) is transposed back when it is stored.
//
// Packed layout (made by opdisagg_rt.ops.pack_weight_amx): [Nb, Kb, 2, 16, 32] bf16 with
// Nb = ceil(N / 32), Kb = ceil(K / 32), zero padded: element [nb, kb, t, i, j] =
// W[32 nb + 16 t + i, 32 kb + j]; for each (column block, k step) two A tiles of 16 columns x
// 32 inputs, 2 KiB contiguous.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define OPDISAGG_AMX 1
#define OPDISAGG_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,avx2,fma,f16c")))
#endif

#include "../ops.h"

namespace opdisagg {
namespace {

constexpr const char* kOp = "linear_amx";
constexpr int64_t kBlockN = 32, kStepK = 32, kTileRows = 16;
constexpr int64_t kBlockStepElems = 2 * 16 * 32;  // two A tiles of one (column block, k step)
// How far ahead (in k steps of 2 KiB) the weight stream is prefetched: enough to cover DRAM
// latency at this machine's bandwidth; prefetching past the end of the weight is harmless.
constexpr int64_t kPrefetchSteps = 4;
// Bytes per (column block, k step) of the GGUF packings (also known to the checks off AMX builds).
constexpr int64_t kQ4StepBytesHost = 640, kQ8StepBytesHost = 1088;

#if defined(OPDISAGG_AMX)
// The kernel needs the CPU's AMX-TILE, AMX-BF16 and AVX512-VBMI and the OS's permission to use the
// tile state (Linux makes each process request it). OPDISAGG_AMX=0 in the environment turns it off.
bool amx_ready_impl() {
  static const bool ok = [] {
    const char* e = std::getenv("OPDISAGG_AMX");
    if (e != nullptr && std::strcmp(e, "0") == 0) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u, vbmi = (c >> 1) & 1u;  // every AMX CPU has VBMI
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return tile && bf16 && vbmi && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (column tile j, row tile i at 2 i + j; fp32, 16 columns x 16 rows); 4-5: A (the
// weight's 16 columns x 32 inputs); 6-7: B (16 input pairs x 16 rows x 2). Every tile is 16 rows
// of 64 bytes.
OPDISAGG_AMX_TARGET void load_tile_config() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// 64-byte aligned storage for the input's B tiles (written with aligned stores).
template <class T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <class U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* p, std::size_t) { std::free(p); }
  bool operator==(const AlignedAlloc&) const { return true; }
};

struct Args {
  const uint16_t* xt;      // the input as B tiles: [Mp / 16, Kb, 16 pairs, 16 rows, 2] bf16
  const void* packed;      // the weight in its source's packed layout
  const uint16_t* bias;    // [N] or nullptr
  const uint16_t* residual;  // [M, N] with row stride res_stride, or nullptr
  uint16_t* out;           // [M, N] with row stride out_stride
  int64_t M, N, Mp, Kb, out_stride, res_stride;
};

// 16 x 16 32-bit elements in registers, transposed in place: four rounds of 16 shuffles.
OPDISAGG_AMX_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4 g + j] now holds rows 4 g .. 4 g + 3 of columns j, j + 4, j + 8, j + 12 (in 128-bit lanes)
  for (int g = 0; g < 2; ++g)
    for (int j = 0; j < 4; ++j) {
      t[8 * g + j] = _mm512_shuffle_i32x4(r[8 * g + j], r[8 * g + 4 + j], 0x88);
      t[8 * g + 4 + j] = _mm512_shuffle_i32x4(r[8 * g + j], r[8 * g + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// Rows [16 c, 16 c + 16) of the input a ([M, 32 Kb], row stride a_stride elements) -> their B
// tiles, one per k step: tile row r holds input pair r of each of the 16 rows (rows past M are
// zero).
OPDISAGG_AMX_TARGET void transpose_rows(const uint16_t* a, int64_t a_stride, int64_t M, int64_t Kb, int64_t c,
                                        uint16_t* xt) {
  const int64_t rows = std::min<int64_t>(kTileRows, M - kTileRows * c);
  const uint16_t* base = a + kTileRows * c * a_stride;
  uint16_t* dst = xt + c * Kb * 512;
  __m512i r[16];
  for (int64_t kb = 0; kb < Kb; ++kb) {
    for (int n = 0; n < 16; ++n)
      r[n] = n < rows ? _mm512_loadu_si512(base + n * a_stride + kb * kStepK) : _mm512_setzero_si512();
    transpose16(r);
    for (int p = 0; p < 16; ++p) _mm512_store_si512(dst + kb * 512 + p * 32, r[p]);
  }
}

// Round to nearest even, as c10::BFloat16 (the values are finite sums of finite products).
OPDISAGG_AMX_TARGET inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(biased, 16));
}

// 32 bf16 -> their first / last 16 as float32.
OPDISAGG_AMX_TARGET inline __m512 widen_lo(__m512i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(x)), 16));
}
OPDISAGG_AMX_TARGET inline __m512 widen_hi(__m512i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1)), 16));
}

// Two stored C tiles (`ct`: columns 0-15 then 16-31 of the block, each [column][row] fp32) ->
// bf16 out rows m0 .. m0 + rows, plus bias, plus the residual rows when given.
OPDISAGG_AMX_TARGET void store_rows(const Args& g, const float* ct, int64_t m0, int64_t rows, int64_t n0) {
  const int64_t cols = std::min<int64_t>(kBlockN, g.N - n0);
  const __mmask32 mask = cols >= 32 ? ~__mmask32{0} : ((__mmask32{1} << cols) - 1);
  __m512i lo_cols[16], hi_cols[16];  // [column][row] -> [row][column]
  for (int i = 0; i < 16; ++i) {
    lo_cols[i] = _mm512_load_si512(ct + 16 * i);
    hi_cols[i] = _mm512_load_si512(ct + 256 + 16 * i);
  }
  transpose16(lo_cols);
  transpose16(hi_cols);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (g.bias != nullptr) {
    const __m512i raw = _mm512_maskz_loadu_epi16(mask, g.bias + n0);
    b0 = widen_lo(raw);
    b1 = widen_hi(raw);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 lo = _mm512_add_ps(_mm512_castsi512_ps(lo_cols[r]), b0);
    const __m512 hi = _mm512_add_ps(_mm512_castsi512_ps(hi_cols[r]), b1);
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(lo)), to_bf16(hi), 1);
    if (g.residual != nullptr) {  // residual + the bf16 projection, rounded again (as a bf16 add)
      const __m512i res = _mm512_maskz_loadu_epi16(mask, g.residual + (m0 + r) * g.res_stride + n0);
      const __m512 sum_lo = _mm512_add_ps(widen_lo(res), widen_lo(both));
      const __m512 sum_hi = _mm512_add_ps(widen_hi(res), widen_hi(both));
      both = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(sum_lo)), to_bf16(sum_hi), 1);
    }
    _mm512_mask_storeu_epi16(g.out + (m0 + r) * g.out_stride + n0, mask, both);
  }
}

// Weight sources: each gives run_blocks a column block as Kb steps of two bf16 A tiles
// ([kb][t][16][32], 2 KiB per step).
//
// Bf16Source: the block sits in the packed weight as is; its stream is prefetched a few steps
// ahead while the tiles of the current step multiply.
struct Bf16Source {
  static constexpr bool kExpands = false;
  OPDISAGG_AMX_TARGET const uint16_t* block(const Args& g, int64_t nb) const {
    const uint16_t* b = static_cast<const uint16_t*>(g.packed) + nb * g.Kb * kBlockStepElems;
    const char* bytes = reinterpret_cast<const char*>(b);
    const int64_t n = g.Kb * kBlockStepElems * 2;
    for (int64_t off = 0; off < std::min<int64_t>(n, kPrefetchSteps * 2048); off += 64)
      _mm_prefetch(bytes + off, _MM_HINT_T0);
    return b;
  }
};

// The GGUF sources expand a quarter (`part`: columns 8 part .. 8 part + 7 of the block, i.e. A
// tile part / 2, its rows 8 (part % 2) .. + 8) of k step kb of column block nb into dst (the
// step's two A tiles, 2 KiB) right before the tiles read it (see run_blocks). Each tile row is
// one GGUF block of one column.
//
// Q4_1, 0.625 bytes per weight: packed by ops.pack_weight_amx_q4_1 as uint8 [Nb, Kb, 640] per
// (column block, k step): for each pair of columns (2 p, 2 p + 1), 32 bytes, byte j = input j's
// quant of column 2 p (low nibble) and of column 2 p + 1 (high nibble); then float16 d[32] and
// m[32]. w = d * q + m in float32 (d * q is exact) rounded to nearest even: bit for bit the
// loader's dequantized bf16 weight. A pair shares one table: its two columns' 16 values each (one
// FMA over q = 0..15 per column, one bf16 conversion for both) in one register, and one word
// permute per column picks the 32 weights (bit 4 of the index selects the column). Against one
// GGUF block per column (a byte permute to spread the nibbles, one conversion per column), the
// expansion alone took 84-93 instead of 123-137 ns per k step (four interleaved runs, one thread).
constexpr int64_t kQ4StepBytes = 640;

struct Q4_1Source {
  static constexpr bool kExpands = true;
  OPDISAGG_AMX_TARGET void expand_part(const Args& g, int64_t nb, int64_t kb, uint16_t* dst, int part) const {
    const uint8_t* step = static_cast<const uint8_t*>(g.packed) + (nb * g.Kb + kb) * kQ4StepBytes;
    if (part == 0) {
      const char* ahead = reinterpret_cast<const char*>(step + kPrefetchSteps * kQ4StepBytes);
      for (int line = 0; line < kQ4StepBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    const int col0 = 8 * part;
    const uint16_t* dm = reinterpret_cast<const uint16_t*>(step + 512);
    alignas(32) float d[8], m[8];
    _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + col0))));
    _mm256_store_ps(m, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 32 + col0))));
    asm volatile("" ::: "memory");  // broadcast each scale from memory (a load), not by shuffles
    const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i upper = _mm512_set1_epi16(16);
    for (int i = 0; i < 8; i += 2) {
      const __m512i quants =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + (col0 + i) * 16)));
      const __m512 first = _mm512_fmadd_ps(q, _mm512_set1_ps(d[i]), _mm512_set1_ps(m[i]));
      const __m512 second = _mm512_fmadd_ps(q, _mm512_set1_ps(d[i + 1]), _mm512_set1_ps(m[i + 1]));
      // words 0-15: the second column's values, 16-31: the first's
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(first, second);
      // first column: its nibble in bits 0-3, bit 4 set (the permute reads bits 0-4 only)
      _mm512_storeu_si512(dst + (col0 + i) * 32,
                          _mm512_permutexvar_epi16(_mm512_or_si512(quants, upper), table));
      _mm512_storeu_si512(dst + (col0 + i + 1) * 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(quants, 4), table));
    }
  }
};

// Q8_0 (GGUF) weights, 1.06 bytes per weight: packed by ops.pack_weight_amx_q8_0 as uint8
// [Nb, Kb, 1088] per (column block, k step): the 32 int8 quants of column i's block for i < 32,
// then float16 d[32]. w = d * q in float32 (exact) rounded to nearest even, as the loader.
constexpr int64_t kQ8StepBytes = 1088;

struct Q8_0Source {
  static constexpr bool kExpands = true;
  OPDISAGG_AMX_TARGET void expand_part(const Args& g, int64_t nb, int64_t kb, uint16_t* dst, int part) const {
    const uint8_t* step = static_cast<const uint8_t*>(g.packed) + (nb * g.Kb + kb) * kQ8StepBytes;
    if (part == 0) {
      const char* ahead = reinterpret_cast<const char*>(step + kPrefetchSteps * kQ8StepBytes);
      for (int line = 0; line < kQ8StepBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    const int col0 = 8 * part;
    alignas(32) float d[8];
    _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(step + 1024 + 2 * col0))));
    asm volatile("" ::: "memory");  // broadcast each scale from memory (a load), not by shuffles
    for (int i = 0; i < 8; ++i) {
      const int8_t* q = reinterpret_cast<const int8_t*>(step + (col0 + i) * 32);
      const __m512 scale = _mm512_set1_ps(d[i]);
      const __m512 lo = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))), scale);
      const __m512 hi = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))), scale);
      _mm512_storeu_si512(dst + (col0 + i) * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
};

// One whole k step of a GGUF block (the four quarters in order).
template <class Source>
OPDISAGG_AMX_TARGET inline void expand_step(const Source& source, const Args& g, int64_t nb, int64_t kb,
                                            uint16_t* dst) {
  for (int part = 0; part < 4; ++part) source.expand_part(g, nb, kb, dst, part);
}

// Column blocks [nb0, nb1): for each, every 32-row chunk of the input accumulates over all k
// steps in the tile registers. A bf16 block is read in place (later row chunks find it in L1/L2).
// A GGUF block with one row chunk (decode batches up to 32) is expanded one k step at a time into
// a small ring, kLookahead steps ahead of the tiles that read it, a quarter of the step after
// each tile multiply: the vector expansion and the tile math then overlap, the input tiles stay
// in L1, and a tile load never waits for the stores of the step it reads. With more row chunks
// the whole block is expanded once into a per-thread buffer that every chunk reads.
constexpr int64_t kLookahead = 2, kRing = 4;
template <class Source>
OPDISAGG_AMX_TARGET void run_blocks(const Args& g, const Source& source, int64_t nb0, int64_t nb1) {
  load_tile_config();
  alignas(64) float ct[2 * 256];  // two C tiles as stored: [column][row]
  alignas(64) uint16_t ring[kRing][kBlockStepElems];
  thread_local std::vector<uint16_t> scratch;
  const bool streamed = Source::kExpands && g.Mp <= 2 * kTileRows;
  if (!streamed && int64_t(scratch.size()) < g.Kb * kBlockStepElems)
    scratch.resize(g.Kb * kBlockStepElems);
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* wblock = nullptr;
    if constexpr (Source::kExpands) {
      if (streamed) {
        for (int64_t kb = 0; kb < std::min<int64_t>(kLookahead, g.Kb); ++kb) expand_step(source, g, nb, kb, ring[kb]);
      } else {
        for (int64_t kb = 0; kb < g.Kb; ++kb) expand_step(source, g, nb, kb, scratch.data() + kb * kBlockStepElems);
        wblock = scratch.data();
      }
    } else {
      wblock = source.block(g, nb);
    }
    for (int64_t m0 = 0; m0 < g.Mp; m0 += 2 * kTileRows) {
      const bool two = m0 + kTileRows < g.Mp;
      const uint16_t* x0 = g.xt + (m0 / kTileRows) * g.Kb * 512;
      const uint16_t* x1 = x0 + g.Kb * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < g.Kb; ++kb) {
        // The ring slot filled a quarter at a time between the multiplies below, or null.
        uint16_t* next = nullptr;
        const uint16_t* w;
        if constexpr (Source::kExpands) {
          if (streamed) {
            if (kb + kLookahead < g.Kb) next = ring[(kb + kLookahead) % kRing];
            w = ring[kb % kRing];
          } else {
            w = wblock + kb * kBlockStepElems;
          }
        } else {
          w = wblock + kb * kBlockStepElems;
          if (m0 == 0) {  // keep the weight stream ahead
            const char* ahead = reinterpret_cast<const char*>(w + kPrefetchSteps * kBlockStepElems);
            for (int line = 0; line < 2 * 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
          }
        }
        auto expand_next = [&](int part) {
          if constexpr (Source::kExpands) {
            if (next != nullptr) source.expand_part(g, nb, kb + kLookahead, next, part);
          }
        };
        _tile_loadd(6, x0 + kb * 512, 64);
        _tile_loadd(4, w, 64);
        _tile_dpbf16ps(0, 4, 6);
        expand_next(0);
        _tile_loadd(5, w + 512, 64);
        _tile_dpbf16ps(1, 5, 6);
        expand_next(1);
        if (two) {
          _tile_loadd(7, x1 + kb * 512, 64);
          _tile_dpbf16ps(2, 4, 7);
        }
        expand_next(2);
        if (two) _tile_dpbf16ps(3, 5, 7);
        expand_next(3);
      }
      _tile_stored(0, ct, 64);
      _tile_stored(1, ct + 256, 64);
      store_rows(g, ct, m0, std::min<int64_t>(kTileRows, g.M - m0), nb * kBlockN);
      if (two && m0 + kTileRows < g.M) {
        _tile_stored(2, ct, 64);
        _tile_stored(3, ct + 256, 64);
        store_rows(g, ct, m0 + kTileRows, std::min<int64_t>(kTileRows, g.M - m0 - kTileRows), nb * kBlockN);
      }
    }
  }
  _tile_release();
}
#endif  // OPDISAGG_AMX

}  // namespace

bool amx_available() {
#if defined(OPDISAGG_AMX)
  return amx_ready_impl();
#else
  return false;
#endif
}

namespace {

// Shared host side of both weight formats: checks, the zero-padded input copy, the split of
// column blocks over threads.
template <class Source>
void linear_amx_run(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                    const char* op) {
  TORCH_CHECK(amx_available(), op,
              ": this CPU (or OS, or OPDISAGG_AMX=0) does not allow AMX-BF16; check "
              "torch.ops.opdisagg.amx_available() before calling");
  TORCH_CHECK(packed.is_contiguous() && out.stride(1) == 1, op,
              ": packed must be contiguous and out rows dense, got strides ", packed.strides(),
              ", ", out.strides());
#if defined(OPDISAGG_AMX)
  const int64_t M = input.size(0), K = input.size(1), N = out.size(1);
  if (M == 0 || N == 0) return;
  const int64_t Kb = packed.size(1), Nb = packed.size(0);
  const int64_t Mp = (M + kTileRows - 1) / kTileRows * kTileRows, Kp = Kb * kStepK;
  // The input's B tiles are read from its rows in place when K fills whole k steps, else from a
  // zero-padded copy (K % 32 != 0: only bf16 weights of odd shapes).
  at::Tensor a = input;
  if (K != Kp || input.stride(1) != 1) {
    a = at::zeros({M, Kp}, input.options());
    a.narrow(1, 0, K).copy_(input);
  }
  // Reused across calls: allocating a tensor per call cost 9-29 us on SmolLM2's shapes (measured).
  thread_local std::vector<uint16_t, AlignedAlloc<uint16_t>> xt;
  const int64_t xt_elems = Mp / kTileRows * Kb * 512;  // one 1 KiB tile per (16 rows, k step)
  if (int64_t(xt.size()) < xt_elems) xt.resize(xt_elems);
  const auto* rows = static_cast<const uint16_t*>(a.const_data_ptr());
  // The calling thread's buffer, by pointer: inside the lambda `xt` would name each worker's own.
  uint16_t* const xt_data = xt.data();
  at::parallel_for(0, Mp / kTileRows, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) transpose_rows(rows, a.stride(0), M, Kb, c, xt_data);
  });
  const auto bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const Args g{xt_data, packed.const_data_ptr(),
               bias_c.defined() ? static_cast<const uint16_t*>(bias_c.const_data_ptr()) : nullptr,
               residual.has_value() ? static_cast<const uint16_t*>(residual->const_data_ptr()) : nullptr,
               static_cast<uint16_t*>(out.data_ptr()), M, N, Mp, Kb, out.stride(0),
               residual.has_value() ? residual->stride(0) : 0};
  // Split the column blocks evenly over the threads: each streams its own slice of the weight.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(2, (Nb + threads - 1) / threads);
  const Source source{};
  at::parallel_for(0, Nb, grain, [&](int64_t b, int64_t e) { run_blocks(g, source, b, e); });
#endif
}

void linear_amx_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_linear_amx(out, input, packed, bias, residual);
#if defined(OPDISAGG_AMX)
  linear_amx_run<Bf16Source>(out, input, packed, bias, residual, kOp);
#else
  linear_amx_run<int>(out, input, packed, bias, residual, kOp);
#endif
}

void linear_amx_q8_0_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_linear_amx_gguf(out, input, packed, bias, residual, "linear_amx_q8_0", kQ8StepBytesHost);
#if defined(OPDISAGG_AMX)
  linear_amx_run<Q8_0Source>(out, input, packed, bias, residual, "linear_amx_q8_0");
#else
  linear_amx_run<int>(out, input, packed, bias, residual, "linear_amx_q8_0");
#endif
}

void linear_amx_q4_1_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_linear_amx_gguf(out, input, packed, bias, residual, "linear_amx_q4_1", kQ4StepBytesHost);
#if defined(OPDISAGG_AMX)
  linear_amx_run<Q4_1Source>(out, input, packed, bias, residual, "linear_amx_q4_1");
#else
  linear_amx_run<int>(out, input, packed, bias, residual, "linear_amx_q4_1");
#endif
}

}  // namespace
}  // namespace opdisagg

TORCH_LIBRARY_IMPL(opdisagg, CPU, m) {
  m.impl("linear_amx", &opdisagg::linear_amx_cpu);
  m.impl("linear_amx_q4_1", &opdisagg::linear_amx_q4_1_cpu);
  m.impl("linear_amx_q8_0", &opdisagg::linear_amx_q8_0_cpu);
}
