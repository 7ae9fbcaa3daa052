// CPU decode step of the linear-attention layers, in place on the state pool: one token per
// request, each continuing from (and overwriting) its float32 state row state[state_indices[n]].
//
//   lightning_attention_decode (MiniMax):   S = decay_h * S + k^T v;            o = q S
//   gated_delta_rule_decode (Qwen3-Next):   S = e^g S;  S += k^T (beta (v - k S));  o = q S
//                                           (q, k optionally L2-normalised, q scaled)
//   causal_conv1d_update (Qwen3-Next):      the short depthwise convolution's decode step over
//                                           [conv_state | x], then conv_state shifts in x
//
// A decode step of these layers is memory-bound: it has to stream each request's whole state
// ([H, d_k, d_v] float32, 1-2 MB) once in and once out, and does ~2 flops per byte. The torch
// form gathers the states (index_select / index), updates the copies with several elementwise
// passes that each allocate a state-sized temporary, and scatters them back: 5-8 state-sized
// memory passes. Here each (request, head) state is updated where it lives, in column tiles
// (128 floats with AVX-512) whose K rows stay in L1/L2 between the tile's passes, so main
// memory sees one read and one write of each state.
//
// Arithmetic is float32 throughout; q/k/v/out may be float32, bfloat16 or float16 (converted
// per head vector, outside the state loops). The state loops are compiled for AVX-512, AVX2 and
// baseline x86-64, picked at load time by CPUID.
#include <ATen/Parallel.h>
#include <c10/core/SymBool.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OPDISAGG_LA_X86 1
#define OPDISAGG_LA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OPDISAGG_LA_X86 0
#define OPDISAGG_LA_CLONES
#endif
#define OPDISAGG_LA_INLINE inline __attribute__((always_inline))

namespace opdisagg {
namespace {

constexpr float kL2NormEps = 1e-6f;  // FLA's / transformers' l2norm: x * rsqrt(sum(x^2) + 1e-6)

// ---- the per-head state updates (S: [K, V] row-major, updated in place) ----------------------
// Written once over a GCC vector type and instantiated per ISA with a native width (4, 8 or 16
// floats; a 16-float type in a non-AVX-512 build lowers to stack traffic, 5x slower), then
// dispatched once by CPUID.
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

template <class Vec>
OPDISAGG_LA_INLINE Vec vload(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class Vec>
OPDISAGG_LA_INLINE void vstore(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// One recurrent decode update of a column tile: S = decay * S + k^T delta, then o = q S on the
// new rows. Lightning: delta = v. Gated delta rule (kDelta): delta = beta (v - k (decay S)), the
// tile's K rows read once more before the update for k S (undecayed: the decay factors out,
// k (e^g S) = e^g (k S)). The tile (K x NV*L floats, 64 KB at 128 x 128 with AVX-512) is still in
// L1/L2 for the update, so main memory sees one read and one write of the state.
template <class Vec, int NV, bool kDelta>
OPDISAGG_LA_INLINE void update_tile(float* S, int64_t ld, int64_t K, const float* q, const float* k,
                                    const float* v, float decay, float beta, float* o) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  Vec acc[NV], delta[NV];
  for (int u = 0; u < NV; ++u) delta[u] = vload<Vec>(v + L * u), acc[u] = Vec{};
  if constexpr (kDelta) {
    for (int64_t i = 0; i < K; ++i) {
      const float* row = S + i * ld;
      const float ki = k[i];
      for (int u = 0; u < NV; ++u) acc[u] += ki * vload<Vec>(row + L * u);
    }
    for (int u = 0; u < NV; ++u) {
      delta[u] = beta * (delta[u] - decay * acc[u]);
      acc[u] = Vec{};
    }
  }
  for (int64_t i = 0; i < K; ++i) {
    float* row = S + i * ld;
    const float ki = k[i], qi = q[i];
    for (int u = 0; u < NV; ++u) {
      const Vec s = vload<Vec>(row + L * u) * decay + ki * delta[u];
      vstore<Vec>(row + L * u, s);
      acc[u] += qi * s;
    }
  }
  for (int u = 0; u < NV; ++u) vstore<Vec>(o + L * u, acc[u]);
}

// All V columns: full tiles, then single vectors, then scalar columns (d_v % L).
template <class Vec, int NV, bool kDelta>
OPDISAGG_LA_INLINE void update_cols(float* S, int64_t K, int64_t V, const float* q, const float* k,
                                    const float* v, float decay, float beta, float* o) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  int64_t j = 0;
  for (; j + NV * L <= V; j += NV * L)
    update_tile<Vec, NV, kDelta>(S + j, V, K, q, k, v + j, decay, beta, o + j);
  for (; j + L <= V; j += L) update_tile<Vec, 1, kDelta>(S + j, V, K, q, k, v + j, decay, beta, o + j);
  for (; j < V; ++j) {
    float delta = v[j];
    if constexpr (kDelta) {
      float ks = 0.0f;
      for (int64_t i = 0; i < K; ++i) ks += k[i] * S[i * V + j];
      delta = beta * (v[j] - decay * ks);
    }
    float acc = 0.0f;
    for (int64_t i = 0; i < K; ++i) {
      float& s = S[i * V + j];
      s = s * decay + k[i] * delta;
      acc += q[i] * s;
    }
    o[j] = acc;
  }
}

#define OPDISAGG_LA_VARIANTS(name, Vec, NV, attr)                                                  \
  attr void lightning_head_##name(float* S, int64_t K, int64_t V, const float* q, const float* k, \
                                  const float* v, float decay, float* o) {                         \
    update_cols<Vec, NV, false>(S, K, V, q, k, v, decay, 1.0f, o);                                \
  }                                                                                                \
  attr void gdn_head_##name(float* S, int64_t K, int64_t V, const float* q, const float* k,       \
                            const float* v, float decay, float beta, float* o) {                   \
    update_cols<Vec, NV, true>(S, K, V, q, k, v, decay, beta, o);                                  \
  }

OPDISAGG_LA_VARIANTS(base, v4, 4, )
#if OPDISAGG_LA_X86
OPDISAGG_LA_VARIANTS(avx2, v8, 4, __attribute__((target("avx2,fma"))))
OPDISAGG_LA_VARIANTS(avx512, v16, 8, __attribute__((target("avx512f,avx2,fma"))))
#endif

using LightningHeadFn = void (*)(float*, int64_t, int64_t, const float*, const float*,
                                 const float*, float, float*);
using GdnHeadFn = void (*)(float*, int64_t, int64_t, const float*, const float*, const float*,
                           float, float, float*);

// The widest variant this CPU runs (picked once at load, like target_clones' resolver), capped
// by OPDISAGG_LINATTN_ISA = 0 (baseline) / 1 (AVX2) / 2 (AVX-512) so tests reach every variant.
int isa_level() {
  int level = 0;
#if OPDISAGG_LA_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) level = 2;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
#endif
  if (const char* cap = std::getenv("OPDISAGG_LINATTN_ISA")) {
    level = std::min(level, std::atoi(cap));
  }
  return level;
}

const LightningHeadFn lightning_head = [] {
#if OPDISAGG_LA_X86
  switch (isa_level()) {
    case 2: return &lightning_head_avx512;
    case 1: return &lightning_head_avx2;
  }
#endif
  return &lightning_head_base;
}();
const GdnHeadFn gdn_head = [] {
#if OPDISAGG_LA_X86
  switch (isa_level()) {
    case 2: return &gdn_head_avx512;
    case 1: return &gdn_head_avx2;
  }
#endif
  return &gdn_head_base;
}();

// ---- head vectors in and out (any of float32 / bfloat16 / float16, unit inner stride) -------

void load_vec(float* dst, const at::Tensor& t, int64_t n, int64_t h, int64_t len) {
  const int64_t off = n * t.stride(0) + h * t.stride(1);
  switch (t.scalar_type()) {
    case at::kFloat: std::memcpy(dst, t.const_data_ptr<float>() + off, len * sizeof(float)); break;
    case at::kBFloat16: {
      const auto* p = t.const_data_ptr<c10::BFloat16>() + off;
      for (int64_t i = 0; i < len; ++i) dst[i] = float(p[i]);
      break;
    }
    default: {
      const auto* p = t.const_data_ptr<c10::Half>() + off;
      for (int64_t i = 0; i < len; ++i) dst[i] = float(p[i]);
    }
  }
}

void store_vec(at::Tensor& t, int64_t n, int64_t h, const float* src, int64_t len) {
  const int64_t off = n * t.stride(0) + h * t.stride(1);
  switch (t.scalar_type()) {
    case at::kFloat: std::memcpy(t.data_ptr<float>() + off, src, len * sizeof(float)); break;
    case at::kBFloat16: {
      auto* p = t.data_ptr<c10::BFloat16>() + off;
      for (int64_t i = 0; i < len; ++i) p[i] = c10::BFloat16(src[i]);
      break;
    }
    default: {
      auto* p = t.data_ptr<c10::Half>() + off;
      for (int64_t i = 0; i < len; ++i) p[i] = c10::Half(src[i]);
    }
  }
}

void l2_normalize(float* x, int64_t len) {
  float ss = 0.0f;
  for (int64_t i = 0; i < len; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss + kL2NormEps);
  for (int64_t i = 0; i < len; ++i) x[i] *= inv;
}

// (request, head) pairs per parallel task: ~128K state floats (512 KB) each, so a small call
// (tests, a few tiny heads) runs on the calling thread and a decode batch splits in ~8 tasks.
int64_t head_grain(int64_t K, int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, K * V));
}

// ---- argument checks (shared by the CPU and Meta kernels; metadata only) --------------------

bool is_io_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_rows3(const at::Tensor& t, const char* op, const char* arg, const char* desc) {
  TORCH_CHECK(t.dim() == 3, op, ": ", arg, " must be ", desc, ", got shape ", t.sym_sizes());
  TORCH_CHECK(is_io_dtype(t.scalar_type()), op, ": ", arg,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// Common to both ops: q, k [N, HK, K], v [N, H, V], out [N, H, V], state [slots, H, K, V]
// float32, state_indices int64 [N].
void check_decode_common(const char* op, const at::Tensor& out, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                         const at::Tensor& state_indices) {
  check_rows3(q, op, "q", "[num_decodes, num_heads, head_k_dim]");
  check_rows3(k, op, "k", "[num_decodes, num_heads, head_k_dim]");
  check_rows3(v, op, "v", "[num_decodes, num_heads, head_v_dim]");
  check_rows3(out, op, "out", "[num_decodes, num_heads, head_v_dim]");
  TORCH_SYM_CHECK(c10::sym_equals(q.sym_sizes(), k.sym_sizes()), op,
                  ": k must have the shape of q ", q.sym_sizes(), ", got ", k.sym_sizes());
  TORCH_SYM_CHECK(c10::sym_equals(out.sym_sizes(), v.sym_sizes()), op,
                  ": out must have the shape of v ", v.sym_sizes(), ", got ", out.sym_sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  TORCH_SYM_CHECK(q.sym_size(0).sym_eq(v.sym_size(0)), op, ": q has ", q.sym_size(0),
                  " rows but v has ", v.sym_size(0));
  TORCH_CHECK(state.dim() == 4 && state.scalar_type() == at::kFloat, op,
              ": state must be float32 [num_slots, num_heads, head_k_dim, head_v_dim], got ",
              state.scalar_type(), " ", state.sym_sizes());
  TORCH_SYM_CHECK(state.sym_size(1).sym_eq(v.sym_size(1)) &
                      state.sym_size(2).sym_eq(q.sym_size(2)) &
                      state.sym_size(3).sym_eq(v.sym_size(2)),
                  op, ": state [num_slots, num_heads, head_k_dim, head_v_dim] = ",
                  state.sym_sizes(), " does not match q ", q.sym_sizes(), " / v ", v.sym_sizes());
  TORCH_CHECK(state_indices.scalar_type() == at::kLong && state_indices.dim() == 1, op,
              ": state_indices must be int64 [num_decodes], got ", state_indices.scalar_type(),
              " ", state_indices.sym_sizes());
  TORCH_SYM_CHECK(state_indices.sym_size(0).sym_eq(q.sym_size(0)), op, ": state_indices has ",
                  state_indices.sym_size(0), " entries for ", q.sym_size(0), " rows");
  for (const at::Tensor* t : {&q, &k, &v, &out, &state_indices}) {
    TORCH_CHECK(t->device() == state.device(), op, ": all tensors must be on one device, got ",
                t->device(), " and state on ", state.device());
  }
}

void check_lightning_decode(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& state,
                            const at::Tensor& state_indices, const at::Tensor& decay) {
  constexpr const char* op = "lightning_attention_decode";
  check_decode_common(op, out, q, k, v, state, state_indices);
  TORCH_SYM_CHECK(q.sym_size(1).sym_eq(v.sym_size(1)), op, ": q has ", q.sym_size(1),
                  " heads but v has ", v.sym_size(1));
  TORCH_CHECK(decay.scalar_type() == at::kFloat && decay.dim() == 1, op,
              ": decay must be float32 [num_heads] (exp(-slope)), got ", decay.scalar_type(), " ",
              decay.sym_sizes());
  TORCH_SYM_CHECK(decay.sym_size(0).sym_eq(v.sym_size(1)), op, ": decay has ",
                  decay.sym_size(0), " entries for ", v.sym_size(1), " heads");
  TORCH_CHECK(decay.device() == state.device(), op, ": decay is on ", decay.device(),
              " but state on ", state.device());
}

void check_gdn_decode(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                      const at::Tensor& state, const at::Tensor& state_indices) {
  constexpr const char* op = "gated_delta_rule_decode";
  check_decode_common(op, out, q, k, v, state, state_indices);
  TORCH_SYM_CHECK(q.sym_size(1).sym_ge(1), op, ": q must have at least one head, got ",
                  q.sym_sizes());
  TORCH_SYM_CHECK((v.sym_size(1) % q.sym_size(1)).sym_eq(0), op,
                  ": value heads (v.size(1) = ", v.sym_size(1),
                  ") must be a multiple of key heads (q.size(1) = ", q.sym_size(1), ")");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&g, "g"}, {&beta, "beta"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2, op, ": ", name,
                " must be float32 [num_decodes, num_value_heads], got ", t->scalar_type(), " ",
                t->sym_sizes());
    TORCH_SYM_CHECK(t->sym_size(0).sym_eq(v.sym_size(0)) & t->sym_size(1).sym_eq(v.sym_size(1)),
                    op, ": ", name, " ", t->sym_sizes(), " does not match v ", v.sym_sizes());
    TORCH_CHECK(t->device() == state.device(), op, ": ", name, " is on ", t->device(),
                " but state on ", state.device());
  }
}

// Every slot in range and used by one row only (two rows on one slot would race and have no
// sequential meaning); checked serially before any write.
at::Tensor checked_indices(const char* op, const at::Tensor& state_indices, int64_t slots) {
  const at::Tensor idx = state_indices.contiguous();
  check_ids_in_range(idx, 0, slots, op, "state_indices", "(state rows = num_slots)");
  std::vector<uint8_t> seen(slots, 0);
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK(!seen[p[i]]++, op, ": state_indices[", i, "] = ", p[i],
                " repeats an earlier row's slot; each decode row needs its own state slot");
  }
  return idx;
}

// CPU-only layout and data checks: head vectors dense, state contiguous, slots as above.
at::Tensor checked_slots(const char* op, const at::Tensor& out, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                         const at::Tensor& state_indices) {
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"},
                         {&out, "out"}}) {
    TORCH_CHECK(t->size(2) <= 1 || t->stride(2) == 1, op, ": ", name,
                " needs a unit stride on its last dimension, got strides ", t->strides());
  }
  check_contiguous(state, op, "state");
  return checked_indices(op, state_indices, state.size(0));
}

void check_conv_update(const at::Tensor& out, const at::Tensor& x, const at::Tensor& conv_state,
                       const at::Tensor& weight, const at::Tensor& state_indices) {
  constexpr const char* op = "causal_conv1d_update";
  TORCH_CHECK(x.dim() == 2 && is_io_dtype(x.scalar_type()), op,
              ": x must be float32/bfloat16/float16 [num_decodes, channels], got ", x.scalar_type(),
              " ", x.sym_sizes());
  TORCH_CHECK(out.dim() == 2 && is_io_dtype(out.scalar_type()), op,
              ": out must be float32/bfloat16/float16 [num_decodes, channels], got ",
              out.scalar_type(), " ", out.sym_sizes());
  TORCH_SYM_CHECK(c10::sym_equals(out.sym_sizes(), x.sym_sizes()), op,
                  ": out must have the shape of x ", x.sym_sizes(), ", got ", out.sym_sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, op,
              ": weight must be float32 [channels, kernel], got ", weight.scalar_type(), " ",
              weight.sym_sizes());
  TORCH_SYM_CHECK(weight.sym_size(0).sym_eq(x.sym_size(1)) & weight.sym_size(1).sym_ge(1), op,
                  ": weight ", weight.sym_sizes(), " does not match x ", x.sym_sizes(),
                  " (want [channels, kernel >= 1])");
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.scalar_type() == at::kFloat, op,
              ": conv_state must be float32 [num_slots, channels, kernel - 1], got ",
              conv_state.scalar_type(), " ", conv_state.sym_sizes());
  TORCH_SYM_CHECK(conv_state.sym_size(1).sym_eq(x.sym_size(1)) &
                      (conv_state.sym_size(2) + 1).sym_eq(weight.sym_size(1)),
                  op, ": conv_state ", conv_state.sym_sizes(), " does not match weight ",
                  weight.sym_sizes(), " (want [num_slots, channels, kernel - 1])");
  TORCH_CHECK(state_indices.scalar_type() == at::kLong && state_indices.dim() == 1, op,
              ": state_indices must be int64 [num_decodes], got ", state_indices.scalar_type(),
              " ", state_indices.sym_sizes());
  TORCH_SYM_CHECK(state_indices.sym_size(0).sym_eq(x.sym_size(0)), op, ": state_indices has ",
                  state_indices.sym_size(0), " entries for ", x.sym_size(0), " rows");
  for (const at::Tensor* t : {&x, &out, &weight, &state_indices}) {
    TORCH_CHECK(t->device() == conv_state.device(), op,
                ": all tensors must be on one device, got ", t->device(), " and conv_state on ",
                conv_state.device());
  }
}

// One row: y[c] = sum_j w[c, j] * [state | x][c, j], then each channel's state drops its oldest
// input and appends x[c]. W = kernel, st points at the row's [C, W-1] state. The kernel size is
// a template parameter for the usual sizes, so the channel loop vectorizes (stride-M groups).
template <int M>
OPDISAGG_LA_INLINE void conv_update_fixed(float* __restrict st, const float* __restrict w,
                                          const float* __restrict x, float* __restrict y,
                                          int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    float* s = st + c * M;
    const float* wc = w + c * (M + 1);
    float sv[M];
    for (int j = 0; j < M; ++j) sv[j] = s[j];
    float acc = wc[M] * x[c];
    for (int j = 0; j < M; ++j) acc += wc[j] * sv[j];
    for (int j = 0; j + 1 < M; ++j) s[j] = sv[j + 1];
    s[M - 1] = x[c];
    y[c] = acc;
  }
}

OPDISAGG_LA_CLONES void conv_update_row(float* st, const float* w, const float* x, float* y,
                                        int64_t C, int64_t W) {
  switch (W) {
    case 2: return conv_update_fixed<1>(st, w, x, y, C);
    case 3: return conv_update_fixed<2>(st, w, x, y, C);
    case 4: return conv_update_fixed<3>(st, w, x, y, C);
    case 5: return conv_update_fixed<4>(st, w, x, y, C);
    default: break;
  }
  const int64_t m = W - 1;
  for (int64_t c = 0; c < C; ++c) {
    float* s = st + c * m;
    const float* wc = w + c * W;
    float acc = wc[m] * x[c];
    for (int64_t j = 0; j < m; ++j) acc += wc[j] * s[j];
    for (int64_t j = 0; j + 1 < m; ++j) s[j] = s[j + 1];
    if (m > 0) s[m - 1] = x[c];
    y[c] = acc;
  }
}

// ---- the ops ---------------------------------------------------------------------------------

void lightning_attention_decode_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, at::Tensor& state,
                                    const at::Tensor& state_indices, const at::Tensor& decay) {
  constexpr const char* op = "lightning_attention_decode";
  check_lightning_decode(out, q, k, v, state, state_indices, decay);
  const at::Tensor idx = checked_slots(op, out, q, k, v, state, state_indices);
  const at::Tensor dec = decay.contiguous();
  const int64_t N = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2);
  if (N == 0) return;
  const int64_t* slot = idx.const_data_ptr<int64_t>();
  const float* dp = dec.const_data_ptr<float>();
  float* sp = state.data_ptr<float>();
  at::parallel_for(0, N * H, head_grain(K, V), [&](int64_t b, int64_t e) {
    std::vector<float> buf(2 * K + 2 * V);
    float *qf = buf.data(), *kf = qf + K, *vf = kf + K, *of = vf + V;
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / H, h = item % H;
      load_vec(qf, q, n, h, K);
      load_vec(kf, k, n, h, K);
      load_vec(vf, v, n, h, V);
      lightning_head(sp + (slot[n] * H + h) * K * V, K, V, qf, kf, vf, dp[h], of);
      store_vec(out, n, h, of, V);
    }
  });
}

void gated_delta_rule_decode_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                                 at::Tensor& state, const at::Tensor& state_indices, double scale,
                                 bool use_qk_l2norm) {
  constexpr const char* op = "gated_delta_rule_decode";
  check_gdn_decode(out, q, k, v, g, beta, state, state_indices);
  const at::Tensor idx = checked_slots(op, out, q, k, v, state, state_indices);
  const int64_t N = q.size(0), HK = q.size(1), H = v.size(1), K = q.size(2), V = v.size(2);
  if (N == 0) return;
  const int64_t group = H / HK;  // value heads per key head (GQA)
  const int64_t* slot = idx.const_data_ptr<int64_t>();
  const float* gp = g.const_data_ptr<float>();
  const float* bp = beta.const_data_ptr<float>();
  const int64_t gs0 = g.stride(0), gs1 = g.stride(1), bs0 = beta.stride(0), bs1 = beta.stride(1);
  float* sp = state.data_ptr<float>();
  const float sc = float(scale);
  at::parallel_for(0, N * H, head_grain(K, V), [&](int64_t b, int64_t e) {
    std::vector<float> buf(2 * K + 2 * V);
    float *qf = buf.data(), *kf = qf + K, *vf = kf + K, *of = vf + V;
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / H, h = item % H, hk = h / group;
      load_vec(qf, q, n, hk, K);
      load_vec(kf, k, n, hk, K);
      if (use_qk_l2norm) l2_normalize(qf, K), l2_normalize(kf, K);
      for (int64_t i = 0; i < K; ++i) qf[i] *= sc;
      load_vec(vf, v, n, h, V);
      const float decay = std::exp(gp[n * gs0 + h * gs1]);
      gdn_head(sp + (slot[n] * H + h) * K * V, K, V, qf, kf, vf, decay, bp[n * bs0 + h * bs1], of);
      store_vec(out, n, h, of, V);
    }
  });
}

void causal_conv1d_update_cpu(at::Tensor& out, const at::Tensor& x, at::Tensor& conv_state,
                              const at::Tensor& weight, const at::Tensor& state_indices) {
  constexpr const char* op = "causal_conv1d_update";
  check_conv_update(out, x, conv_state, weight, state_indices);
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&x, "x"}, {&out, "out"}}) {
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, op, ": ", name,
                " needs a unit stride on channels, got strides ", t->strides());
  }
  check_contiguous(conv_state, op, "conv_state");
  check_contiguous(weight, op, "weight");
  const at::Tensor idx = checked_indices(op, state_indices, conv_state.size(0));
  const int64_t* slot = idx.const_data_ptr<int64_t>();
  const int64_t N = x.size(0), C = x.size(1), W = weight.size(1);
  if (N == 0 || C == 0) return;
  // Per task: whole rows (the state row of one request is C * (W - 1) floats).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (C * W));
  float* sp = conv_state.data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const at::Tensor xr = x.unsqueeze(1);  // [N, 1, C]: rows as the head-vector helpers see them
  at::Tensor orow = out.unsqueeze(1);
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    std::vector<float> buf(2 * C);
    float *xf = buf.data(), *yf = xf + C;
    for (int64_t n = b; n < e; ++n) {
      load_vec(xf, xr, n, 0, C);
      conv_update_row(sp + slot[n] * C * (W - 1), wp, xf, yf, C, W);
      store_vec(orow, n, 0, yf, C);
    }
  });
}

// Meta kernels: the checks only (the ops write into their arguments).
void causal_conv1d_update_meta(at::Tensor& out, const at::Tensor& x, at::Tensor& conv_state,
                               const at::Tensor& weight, const at::Tensor& state_indices) {
  check_conv_update(out, x, conv_state, weight, state_indices);
}

void lightning_attention_decode_meta(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, at::Tensor& state,
                                     const at::Tensor& state_indices, const at::Tensor& decay) {
  check_lightning_decode(out, q, k, v, state, state_indices, decay);
}

void gated_delta_rule_decode_meta(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                                  at::Tensor& state, const at::Tensor& state_indices,
                                  double /*scale*/, bool /*use_qk_l2norm*/) {
  check_gdn_decode(out, q, k, v, g, beta, state, state_indices);
}

}  // namespace
}  // namespace opdisagg

TORCH_LIBRARY_IMPL(opdisagg, CPU, m) {
  m.impl("lightning_attention_decode", &opdisagg::lightning_attention_decode_cpu);
  m.impl("gated_delta_rule_decode", &opdisagg::gated_delta_rule_decode_cpu);
  m.impl("causal_conv1d_update", &opdisagg::causal_conv1d_update_cpu);
}

TORCH_LIBRARY_IMPL(opdisagg, Meta, m) {
  m.impl("lightning_attention_decode", &opdisagg::lightning_attention_decode_meta);
  m.impl("gated_delta_rule_decode", &opdisagg::gated_delta_rule_decode_meta);
  m.impl("causal_conv1d_update", &opdisagg::causal_conv1d_update_meta);
}
