// CUDA dispatch of the opdisagg ops: torch-facing argument handling around the raw-pointer
// launchers of cache_kernels.cu and elementwise_kernels.cu. Built only with a CUDA torch (see
// setup.py).
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "cache_kernels.h"
#include "elementwise_kernels.h"

namespace opdisagg {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "reshape_and_cache";
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  check_kernel_layout_reshape_and_cache(key, value, key_cache, value_cache);
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const auto slots = slot_mapping.contiguous();
  check_launch(opdisagg_reshape_and_cache_launch(
                   key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                   slots.const_data_ptr<int64_t>(), key.size(0), key.size(1), key.size(2),
                   key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                   key_cache.size(0) * key_cache.size(1),
                   static_cast<int>(key.element_size()), stream()),
               op);
}

void copy_blocks_cuda(at::TensorList key_caches, at::TensorList value_caches,
                      const at::Tensor& block_mapping) {
  constexpr const char* op = "copy_blocks";
  check_copy_blocks(key_caches, value_caches, block_mapping);
  if (key_caches.empty() || block_mapping.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(block_mapping.device());
  // One launch for all layers: the kernel reads each cache's {base, block bytes, num_blocks}
  // from a small device table instead of one launch per cache.
  std::vector<int64_t> table;
  auto add = [&](at::TensorList caches, const char* arg) {
    for (size_t i = 0; i < caches.size(); ++i) {
      check_contiguous(caches[i], op, c10::str(arg, "[", i, "]").c_str());
      table.insert(table.end(), {reinterpret_cast<int64_t>(caches[i].data_ptr()),
                                 block_bytes(caches[i]), caches[i].size(0)});
    }
  };
  add(key_caches, "key_caches");
  add(value_caches, "value_caches");
  const int64_t num_caches = static_cast<int64_t>(table.size() / 3);
  const auto table_dev = at::from_blob(table.data(), {num_caches, 3}, at::kLong)
                             .to(block_mapping.device(), /*non_blocking=*/false);
  const auto mapping = block_mapping.contiguous();
  check_launch(opdisagg_copy_blocks_launch(table.data(), table_dev.const_data_ptr<int64_t>(),
                                           num_caches, mapping.const_data_ptr<int64_t>(),
                                           mapping.size(0), stream()),
               op);
}

at::Tensor gather_blocks_cuda(const at::Tensor& cache, const at::Tensor& block_ids) {
  constexpr const char* op = "gather_blocks";
  check_gather_blocks(cache, block_ids);
  check_contiguous(cache, op, "cache");
  const c10::cuda::CUDAGuard guard(cache.device());
  const auto ids = block_ids.contiguous();
  auto sizes = cache.sizes().vec();
  sizes[0] = ids.size(0);
  auto out = at::empty(sizes, cache.options());
  check_launch(opdisagg_gather_blocks_launch(
                   cache.data_ptr(), out.data_ptr(), ids.const_data_ptr<int64_t>(), ids.size(0),
                   block_bytes(cache) / cache.element_size(), cache.size(0),
                   static_cast<int>(cache.element_size()), stream()),
               op);
  return out;
}

void scatter_blocks_cuda(const at::Tensor& buffer, at::Tensor& cache, const at::Tensor& block_ids) {
  constexpr const char* op = "scatter_blocks";
  check_scatter_blocks(buffer, cache, block_ids);
  check_contiguous(cache, op, "cache");
  const c10::cuda::CUDAGuard guard(cache.device());
  const auto ids = block_ids.contiguous();
  const auto src = buffer.contiguous();
  check_launch(opdisagg_scatter_blocks_launch(
                   src.data_ptr(), cache.data_ptr(), ids.const_data_ptr<int64_t>(), ids.size(0),
                   block_bytes(cache) / cache.element_size(), cache.size(0),
                   static_cast<int>(cache.element_size()), stream()),
               op);
}

// The checks admit only float32, bfloat16 and float16 activations.
opdisagg_elem_kind elem_kind(const at::Tensor& t, const char* op) {
  const auto dtype = t.scalar_type();
  if (dtype == at::kFloat) return OPDISAGG_ELEM_F32;
  if (dtype == at::kBFloat16) return OPDISAGG_ELEM_BF16;
  TORCH_CHECK(dtype == at::kHalf, op, ": unsupported dtype ", dtype);
  return OPDISAGG_ELEM_F16;
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                   double epsilon) {
  constexpr const char* op = "rms_norm";
  check_rms_norm(out, input, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t hidden = input.size(-1);
  const auto x = input.reshape({-1, hidden});
  auto o = out.view({-1, hidden});
  TORCH_CHECK(x.stride(-1) == 1 && o.stride(-1) == 1 && weight.is_contiguous(),
              "rms_norm: input, out and weight need a unit stride on the hidden dimension, got "
              "strides ", input.strides(), ", ", out.strides(), ", ", weight.strides());
  check_launch(opdisagg_rms_norm_launch(o.data_ptr(), x.const_data_ptr(), weight.const_data_ptr(),
                                        x.size(0), hidden, o.stride(0), x.stride(0),
                                        static_cast<float>(epsilon), elem_kind(input, op),
                                        stream()),
               op);
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "silu_and_mul";
  check_silu_and_mul(out, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t d = out.size(-1);
  const auto x = input.reshape({-1, 2 * d});
  auto o = out.view({-1, d});
  TORCH_CHECK(x.stride(-1) == 1 && o.stride(-1) == 1,
              "silu_and_mul: input and out need a unit stride on the last dimension, got strides ",
              input.strides(), ", ", out.strides());
  check_launch(opdisagg_silu_and_mul_launch(o.data_ptr(), x.const_data_ptr(), x.size(0), d,
                                            o.stride(0), x.stride(0), elem_kind(input, op),
                                            stream()),
               op);
}

// Positions outside the table are skipped on the device (the CPU twin raises on them; checking
// here would need a device sync), as the cache ops do with out-of-range ids.
void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                           const at::Tensor& cos_sin_cache, bool is_neox) {
  constexpr const char* op = "rotary_embedding";
  check_rotary_embedding(positions, query, key, cos_sin_cache);
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1,
              "rotary_embedding: query and key need a unit stride on head_dim, got strides ",
              query.strides(), ", ", key.strides());
  check_contiguous(cos_sin_cache, op, "cos_sin_cache");
  const c10::cuda::CUDAGuard guard(query.device());
  const auto pos = positions.contiguous();
  check_launch(opdisagg_rotary_embedding_launch(
                   pos.const_data_ptr<int64_t>(), query.data_ptr(), key.data_ptr(),
                   cos_sin_cache.const_data_ptr<float>(), query.size(0), query.size(1),
                   key.size(1), cos_sin_cache.size(1), query.stride(0), query.stride(1),
                   key.stride(0), key.stride(1), cos_sin_cache.size(0), is_neox ? 1 : 0,
                   elem_kind(query, op), stream()),
               op);
}

}  // namespace
}  // namespace opdisagg

TORCH_LIBRARY_IMPL(opdisagg, CUDA, m) {
  m.impl("reshape_and_cache", &opdisagg::reshape_and_cache_cuda);
  m.impl("copy_blocks", &opdisagg::copy_blocks_cuda);
  m.impl("gather_blocks", &opdisagg::gather_blocks_cuda);
  m.impl("scatter_blocks", &opdisagg::scatter_blocks_cuda);
  m.impl("rms_norm", &opdisagg::rms_norm_cuda);
  m.impl("silu_and_mul", &opdisagg::silu_and_mul_cuda);
  m.impl("rotary_embedding", &opdisagg::rotary_embedding_cuda);
}
