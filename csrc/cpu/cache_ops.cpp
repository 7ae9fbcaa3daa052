// CPU kernels of the paged-KV copy ops. They move bytes (memcpy), never do arithmetic, so one
// path serves every dtype, and they split the work over tokens/blocks with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../ops.h"

namespace opdisagg {
namespace {

// Aim for ~64 KiB of copying per task: tiny calls stay on one thread (waking the pool costs more
// than the copy) and large ones use every core.
int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, bytes_per_item));
}

char* bytes_of(const at::Tensor& t) { return static_cast<char*>(t.data_ptr()); }

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "reshape_and_cache";
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  check_kernel_layout_reshape_and_cache(key, value, key_cache, value_cache);
  const int64_t num_tokens = key.size(0);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const auto slots = slot_mapping.contiguous();
  check_ids_in_range(slots, -1, num_slots, op, "slot_mapping", "(num_blocks * block_size)");
  if (num_tokens == 0 || key.numel() == 0) return;

  const int64_t heads = key.size(1);
  const int64_t esize = key.element_size();
  const int64_t head_bytes = key.size(2) * esize;
  const int64_t row_bytes = heads * head_bytes;  // one slot of the cache
  const int64_t* s = slots.const_data_ptr<int64_t>();
  const char* k = bytes_of(key);
  const char* v = bytes_of(value);
  char* kc = bytes_of(key_cache);
  char* vc = bytes_of(value_cache);
  const int64_t kts = key.stride(0) * esize, khs = key.stride(1) * esize;
  const int64_t vts = value.stride(0) * esize, vhs = value.stride(1) * esize;

  // Copies one token's [heads, head_dim] rows; one memcpy when the heads are packed.
  auto copy_row = [&](const char* src, int64_t head_stride, char* dst) {
    if (head_stride == head_bytes || heads == 1) {
      std::memcpy(dst, src, row_bytes);
    } else {
      for (int64_t h = 0; h < heads; ++h)
        std::memcpy(dst + h * head_bytes, src + h * head_stride, head_bytes);
    }
  };
  at::parallel_for(0, num_tokens, grain_for(2 * row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (s[t] < 0) continue;
      copy_row(k + t * kts, khs, kc + s[t] * row_bytes);
      copy_row(v + t * vts, vhs, vc + s[t] * row_bytes);
    }
  });
}

void copy_blocks_cpu(at::TensorList key_caches, at::TensorList value_caches,
                     const at::Tensor& block_mapping) {
  constexpr const char* op = "copy_blocks";
  check_copy_blocks(key_caches, value_caches, block_mapping);
  std::vector<char*> bases;
  std::vector<int64_t> sizes;
  int64_t min_blocks = INT64_MAX;
  auto add = [&](at::TensorList caches, const char* arg) {
    for (size_t i = 0; i < caches.size(); ++i) {
      check_contiguous(caches[i], op, c10::str(arg, "[", i, "]").c_str());
      min_blocks = std::min(min_blocks, caches[i].size(0));
      bases.push_back(bytes_of(caches[i]));
      sizes.push_back(block_bytes(caches[i]));
    }
  };
  add(key_caches, "key_caches");
  add(value_caches, "value_caches");
  const auto mapping = block_mapping.contiguous();
  if (bases.empty() || mapping.size(0) == 0) return;
  check_ids_in_range(mapping, 0, min_blocks, op, "block_mapping", "(num_blocks of the smallest cache)");

  // One work item per (cache, pair). Pairs are assumed independent (no dst is another pair's
  // src), which the block manager guarantees for copy-on-write.
  const int64_t pairs = mapping.size(0);
  const int64_t* m = mapping.const_data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(bases.size()) * pairs, grain_for(sizes[0]),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const int64_t c = i / pairs, p = i % pairs;
                       std::memcpy(bases[c] + m[2 * p + 1] * sizes[c],
                                   bases[c] + m[2 * p] * sizes[c], sizes[c]);
                     }
                   });
}

// Copies n blocks of `bytes` each from src[src_id(i)] to dst[dst_id(i)] in parallel.
template <typename SrcId, typename DstId>
void copy_indexed_blocks(const char* src, char* dst, int64_t n, int64_t bytes, SrcId src_id,
                         DstId dst_id) {
  at::parallel_for(0, n, grain_for(bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(dst + dst_id(i) * bytes, src + src_id(i) * bytes, bytes);
  });
}

at::Tensor gather_blocks_cpu(const at::Tensor& cache, const at::Tensor& block_ids) {
  constexpr const char* op = "gather_blocks";
  check_gather_blocks(cache, block_ids);
  check_contiguous(cache, op, "cache");
  const auto ids = block_ids.contiguous();
  check_ids_in_range(ids, 0, cache.size(0), op, "block_ids", "(num_blocks of cache)");
  auto sizes = cache.sizes().vec();
  sizes[0] = ids.size(0);
  auto out = at::empty(sizes, cache.options());
  const int64_t bytes = block_bytes(cache);
  if (out.numel() == 0) return out;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  copy_indexed_blocks(bytes_of(cache), bytes_of(out), ids.size(0), bytes,
                      [id](int64_t i) { return id[i]; }, [](int64_t i) { return i; });
  return out;
}

void scatter_blocks_cpu(const at::Tensor& buffer, at::Tensor& cache, const at::Tensor& block_ids) {
  constexpr const char* op = "scatter_blocks";
  check_scatter_blocks(buffer, cache, block_ids);
  check_contiguous(cache, op, "cache");
  const auto ids = block_ids.contiguous();
  check_ids_in_range(ids, 0, cache.size(0), op, "block_ids", "(num_blocks of cache)");
  if (buffer.numel() == 0) return;
  const auto src = buffer.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  // Duplicate ids: one of the copies wins, unspecified which (same as index_put_).
  copy_indexed_blocks(bytes_of(src), bytes_of(cache), ids.size(0), block_bytes(cache),
                      [](int64_t i) { return i; }, [id](int64_t i) { return id[i]; });
}

}  // namespace
}  // namespace opdisagg

TORCH_LIBRARY_IMPL(opdisagg, CPU, m) {
  m.impl("reshape_and_cache", &opdisagg::reshape_and_cache_cpu);
  m.impl("copy_blocks", &opdisagg::copy_blocks_cpu);
  m.impl("gather_blocks", &opdisagg::gather_blocks_cpu);
  m.impl("scatter_blocks", &opdisagg::scatter_blocks_cpu);
}
