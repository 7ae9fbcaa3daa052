// CUDA kernels of the paged-KV copy ops, with extern "C" launchers over raw pointers.
// Only the CUDA runtime and plain C++ here (see cache_kernels.h for why).
//
// The ops only move bytes, so each kernel is templated on a copy word W (16, 8, 4, 2 or 1
// bytes) instead of the dtype: the launcher picks the widest word that divides every pointer,
// row size and stride, so one kernel serves fp32/bf16/fp16/fp8 and rows of 16-byte multiples
// (the common case) move as 128-bit loads.
#include "cache_kernels.h"

#include <cuda_runtime.h>

#include <stdint.h>

namespace {

constexpr int kThreads = 256;
// gridDim.y is limited to 65535, so copy_blocks launches its caches (grid y) in chunks.
constexpr int64_t kMaxGridY = 65535;

// Widest copy word dividing `bits`: addresses, sizes and strides OR-ed together.
int word_size(uint64_t bits) {
  int w = 16;
  while (w > 1 && (bits % w) != 0) w /= 2;
  return w;
}

template <typename W>
__global__ void reshape_and_cache_kernel(const char* __restrict__ key,
                                         const char* __restrict__ value,
                                         char* __restrict__ key_cache,
                                         char* __restrict__ value_cache,
                                         const int64_t* __restrict__ slot_mapping,
                                         int64_t num_heads, int64_t head_bytes, int64_t k_tok,
                                         int64_t k_head, int64_t v_tok, int64_t v_head,
                                         int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0 || slot >= num_slots) return;  // -1 = padding / not cached
  const int64_t head_words = head_bytes / sizeof(W);
  const int64_t row_bytes = num_heads * head_bytes;
  W* kc = reinterpret_cast<W*>(key_cache + slot * row_bytes);
  W* vc = reinterpret_cast<W*>(value_cache + slot * row_bytes);
  for (int64_t i = threadIdx.x; i < num_heads * head_words; i += blockDim.x) {
    const int64_t h = i / head_words, w = i % head_words;
    kc[i] = reinterpret_cast<const W*>(key + t * k_tok + h * k_head)[w];
    vc[i] = reinterpret_cast<const W*>(value + t * v_tok + h * v_head)[w];
  }
}

// blockIdx.x: pair, blockIdx.y: cache. The table row holds {base, block_bytes, num_blocks}.
template <typename W>
__global__ void copy_blocks_kernel(const int64_t* __restrict__ caches,
                                   const int64_t* __restrict__ mapping) {
  const int64_t* c = caches + 3 * blockIdx.y;
  char* base = reinterpret_cast<char*>(c[0]);
  const int64_t bytes = c[1], num_blocks = c[2];
  const int64_t src = mapping[2 * blockIdx.x], dst = mapping[2 * blockIdx.x + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  const W* s = reinterpret_cast<const W*>(base + src * bytes);
  W* d = reinterpret_cast<W*>(base + dst * bytes);
  for (int64_t i = threadIdx.x; i < bytes / (int64_t)sizeof(W); i += blockDim.x) d[i] = s[i];
}

// One CUDA block per id: gather copies cache[ids[i]] -> dense[i], scatter the reverse.
template <typename W, bool kScatter>
__global__ void gather_scatter_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                      const int64_t* __restrict__ ids, int64_t block_bytes,
                                      int64_t num_blocks) {
  const int64_t i = blockIdx.x;
  const int64_t id = ids[i];
  if (id < 0 || id >= num_blocks) return;
  const int64_t src_block = kScatter ? i : id, dst_block = kScatter ? id : i;
  const W* s = reinterpret_cast<const W*>(src + src_block * block_bytes);
  W* d = reinterpret_cast<W*>(dst + dst_block * block_bytes);
  for (int64_t j = threadIdx.x; j < block_bytes / (int64_t)sizeof(W); j += blockDim.x) d[j] = s[j];
}

template <typename W>
struct Word {
  using type = W;
};

// Calls f(Word<W>{}) with the copy word type for `w` bytes, then reports launch errors.
template <typename F>
cudaError_t with_word(int w, F&& f) {
  switch (w) {
    case 16: f(Word<uint4>{}); break;
    case 8: f(Word<uint2>{}); break;
    case 4: f(Word<uint32_t>{}); break;
    case 2: f(Word<uint16_t>{}); break;
    default: f(Word<uint8_t>{}); break;
  }
  return cudaGetLastError();
}

cudaError_t gather_scatter(const void* src, void* dst, const int64_t* ids, int64_t num_ids,
                           int64_t block_numel, int64_t num_blocks, int elem_size,
                           cudaStream_t stream, bool scatter) {
  if (num_ids == 0 || block_numel == 0) return cudaSuccess;
  const int64_t bytes = block_numel * elem_size;
  const int w = word_size((uint64_t)(uintptr_t)src | (uint64_t)(uintptr_t)dst | (uint64_t)bytes);
  return with_word(w, [&](auto word) {
    using W = typename decltype(word)::type;
    if (scatter)
      gather_scatter_kernel<W, true><<<(unsigned)num_ids, kThreads, 0, stream>>>(
          (const char*)src, (char*)dst, ids, bytes, num_blocks);
    else
      gather_scatter_kernel<W, false><<<(unsigned)num_ids, kThreads, 0, stream>>>(
          (const char*)src, (char*)dst, ids, bytes, num_blocks);
  });
}

}  // namespace

extern "C" cudaError_t opdisagg_reshape_and_cache_launch(
    const void* key, const void* value, void* key_cache, void* value_cache,
    const int64_t* slot_mapping, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
    int64_t key_token_stride, int64_t key_head_stride, int64_t value_token_stride,
    int64_t value_head_stride, int64_t num_slots, int elem_size, cudaStream_t stream) {
  if (num_tokens == 0 || num_heads == 0 || head_dim == 0) return cudaSuccess;
  const int64_t e = elem_size, head_bytes = head_dim * e;
  const int64_t kt = key_token_stride * e, kh = key_head_stride * e;
  const int64_t vt = value_token_stride * e, vh = value_head_stride * e;
  const uint64_t bits = (uint64_t)(uintptr_t)key | (uint64_t)(uintptr_t)value |
                        (uint64_t)(uintptr_t)key_cache | (uint64_t)(uintptr_t)value_cache |
                        (uint64_t)(head_bytes | kt | kh | vt | vh);
  const int w = word_size(bits);
  // Small rows (few heads) would leave most of a 256-thread block idle.
  const int threads = num_heads * head_bytes / w < kThreads ? 64 : kThreads;
  return with_word(w, [&](auto word) {
    using W = typename decltype(word)::type;
    reshape_and_cache_kernel<W><<<(unsigned)num_tokens, threads, 0, stream>>>(
        (const char*)key, (const char*)value, (char*)key_cache, (char*)value_cache, slot_mapping,
        num_heads, head_bytes, kt, kh, vt, vh, num_slots);
  });
}

extern "C" cudaError_t opdisagg_copy_blocks_launch(const int64_t* caches_host,
                                                   const int64_t* caches_dev, int64_t num_caches,
                                                   const int64_t* block_mapping, int64_t num_pairs,
                                                   cudaStream_t stream) {
  if (num_caches == 0 || num_pairs == 0) return cudaSuccess;
  uint64_t bits = 0;
  for (int64_t c = 0; c < num_caches; ++c)
    bits |= (uint64_t)caches_host[3 * c] | (uint64_t)caches_host[3 * c + 1];
  const int w = word_size(bits);
  // Pairs go on grid x (up to 2^31-1); caches on grid y, chunked to its 65535 limit.
  for (int64_t c0 = 0; c0 < num_caches; c0 += kMaxGridY) {
    const int64_t nc = num_caches - c0 < kMaxGridY ? num_caches - c0 : kMaxGridY;
    const dim3 grid((unsigned)num_pairs, (unsigned)nc);
    const cudaError_t err = with_word(w, [&](auto word) {
      using W = typename decltype(word)::type;
      copy_blocks_kernel<W><<<grid, kThreads, 0, stream>>>(caches_dev + 3 * c0, block_mapping);
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

extern "C" cudaError_t opdisagg_gather_blocks_launch(const void* cache, void* out,
                                                     const int64_t* block_ids, int64_t num_ids,
                                                     int64_t block_numel, int64_t num_blocks,
                                                     int elem_size, cudaStream_t stream) {
  return gather_scatter(cache, out, block_ids, num_ids, block_numel, num_blocks, elem_size,
                        stream, /*scatter=*/false);
}

extern "C" cudaError_t opdisagg_scatter_blocks_launch(const void* buffer, void* cache,
                                                      const int64_t* block_ids, int64_t num_ids,
                                                      int64_t block_numel, int64_t num_blocks,
                                                      int elem_size, cudaStream_t stream) {
  return gather_scatter(buffer, cache, block_ids, num_ids, block_numel, num_blocks, elem_size,
                        stream, /*scatter=*/true);
}
