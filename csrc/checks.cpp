// Argument checks shared by the CPU, CUDA and Meta kernels. Messages name the op, the argument
// and what is wrong, with the shapes involved, so a caller can fix the call without reading C++.
#include "ops.h"

#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

namespace opdisagg {
namespace {

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* arg, const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ",
              ref_arg, " is on ", ref.device(), "; all tensors must be on one device");
}

void check_index_tensor(const at::Tensor& ids, const char* op, const char* arg,
                        int64_t dim, const char* shape_desc) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ", arg, " must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.dim() == dim, op, ": ", arg, " must be ", shape_desc, ", got shape ",
              ids.sym_sizes());
}

void check_cache_pair(const at::Tensor& key_cache, const at::Tensor& value_cache, const char* op) {
  TORCH_CHECK(key_cache.dim() == 4, op,
              ": key_cache must be [num_blocks, block_size, kv_heads, head_dim], got shape ",
              key_cache.sym_sizes());
  TORCH_SYM_CHECK(c10::sym_equals(key_cache.sym_sizes(), value_cache.sym_sizes()), op,
                  ": value_cache must have the shape of key_cache ", key_cache.sym_sizes(),
                  ", got ", value_cache.sym_sizes());
}

}  // namespace

void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& key_cache, const at::Tensor& value_cache,
                             const at::Tensor& slot_mapping) {
  constexpr const char* op = "reshape_and_cache";
  TORCH_CHECK(key.dim() == 3, op, ": key must be [num_tokens, kv_heads, head_dim], got shape ",
              key.sym_sizes());
  TORCH_SYM_CHECK(c10::sym_equals(key.sym_sizes(), value.sym_sizes()), op,
                  ": value must have the shape of key ", key.sym_sizes(), ", got ",
                  value.sym_sizes());
  check_cache_pair(key_cache, value_cache, op);
  TORCH_SYM_CHECK(key_cache.sym_size(2).sym_eq(key.sym_size(1)) &
                      key_cache.sym_size(3).sym_eq(key.sym_size(2)),
                  op, ": key_cache [num_blocks, block_size, kv_heads, head_dim] = ",
                  key_cache.sym_sizes(), " does not match key [num_tokens, kv_heads, head_dim] = ",
                  key.sym_sizes(), " in kv_heads/head_dim");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() &&
                  value.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type(),
              op, ": key, value, key_cache and value_cache must share one dtype, got ",
              key.scalar_type(), ", ", value.scalar_type(), ", ", key_cache.scalar_type(), ", ",
              value_cache.scalar_type());
  check_index_tensor(slot_mapping, op, "slot_mapping", 1, "1-D [num_tokens]");
  TORCH_SYM_CHECK(slot_mapping.sym_size(0).sym_eq(key.sym_size(0)), op,
                  ": slot_mapping has ", slot_mapping.sym_size(0), " entries but key has ",
                  key.sym_size(0), " tokens");
  check_same_device(key, key_cache, op, "key", "key_cache");
  check_same_device(value, key_cache, op, "value", "key_cache");
  check_same_device(value_cache, key_cache, op, "value_cache", "key_cache");
  check_same_device(slot_mapping, key_cache, op, "slot_mapping", "key_cache");
}

void check_copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                       const at::Tensor& block_mapping) {
  constexpr const char* op = "copy_blocks";
  TORCH_CHECK(key_caches.size() == value_caches.size(), op, ": got ", key_caches.size(),
              " key_caches but ", value_caches.size(), " value_caches");
  check_index_tensor(block_mapping, op, "block_mapping", 2, "[num_pairs, 2] (src, dst)");
  TORCH_SYM_CHECK(block_mapping.sym_size(1).sym_eq(2), op,
                  ": block_mapping must be [num_pairs, 2] (src, dst), got shape ",
                  block_mapping.sym_sizes());
  auto check_list = [&](at::TensorList caches, const char* arg) {
    for (size_t i = 0; i < caches.size(); ++i) {
      TORCH_CHECK(caches[i].dim() >= 1, op, ": ", arg, "[", i,
                  "] must have a leading num_blocks dim, got a 0-d tensor");
      TORCH_CHECK(caches[i].device() == block_mapping.device(), op, ": ", arg, "[", i,
                  "] is on ", caches[i].device(), " but block_mapping is on ",
                  block_mapping.device(), "; all tensors must be on one device");
    }
  };
  check_list(key_caches, "key_caches");
  check_list(value_caches, "value_caches");
}

void check_gather_blocks(const at::Tensor& cache, const at::Tensor& block_ids) {
  constexpr const char* op = "gather_blocks";
  TORCH_CHECK(cache.dim() >= 1, op,
              ": cache must have a leading num_blocks dim, got a 0-d tensor");
  check_index_tensor(block_ids, op, "block_ids", 1, "1-D [n]");
  check_same_device(block_ids, cache, op, "block_ids", "cache");
}

void check_scatter_blocks(const at::Tensor& buffer, const at::Tensor& cache,
                          const at::Tensor& block_ids) {
  constexpr const char* op = "scatter_blocks";
  TORCH_CHECK(cache.dim() >= 1, op,
              ": cache must have a leading num_blocks dim, got a 0-d tensor");
  check_index_tensor(block_ids, op, "block_ids", 1, "1-D [n]");
  TORCH_CHECK(buffer.dim() == cache.dim(), op, ": buffer must be [n, *cache.shape[1:]] = [",
              block_ids.sym_size(0), ", ", cache.sym_sizes().slice(1), "], got shape ",
              buffer.sym_sizes());
  TORCH_SYM_CHECK(buffer.sym_size(0).sym_eq(block_ids.sym_size(0)) &
                      c10::sym_equals(buffer.sym_sizes().slice(1), cache.sym_sizes().slice(1)),
                  op, ": buffer must be [n, *cache.shape[1:]] = [", block_ids.sym_size(0), ", ",
                  cache.sym_sizes().slice(1), "], got shape ", buffer.sym_sizes());
  TORCH_CHECK(buffer.scalar_type() == cache.scalar_type(), op, ": buffer dtype ",
              buffer.scalar_type(), " does not match cache dtype ", cache.scalar_type());
  check_same_device(buffer, cache, op, "buffer", "cache");
  check_same_device(block_ids, cache, op, "block_ids", "cache");
}

void check_paged_attention(const at::Tensor& out, const at::Tensor& query,
                           const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens, const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "paged_attention";
  TORCH_CHECK(query.dim() == 3, op, ": query must be [num_tokens, heads, head_dim], got shape ",
              query.sym_sizes());
  TORCH_SYM_CHECK(c10::sym_equals(out.sym_sizes(), query.sym_sizes()), op,
                  ": out must have the shape of query ", query.sym_sizes(), ", got ",
                  out.sym_sizes());
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": query must be float32, bfloat16 or float16, got ", dtype);
  check_cache_pair(key_cache, value_cache, op);
  TORCH_CHECK(out.scalar_type() == dtype && key_cache.scalar_type() == dtype &&
                  value_cache.scalar_type() == dtype,
              op, ": out, query, key_cache and value_cache must share one dtype, got ",
              out.scalar_type(), ", ", dtype, ", ", key_cache.scalar_type(), ", ",
              value_cache.scalar_type());
  TORCH_SYM_CHECK(key_cache.sym_size(3).sym_eq(query.sym_size(2)), op,
                  ": key_cache head_dim ", key_cache.sym_size(3), " (shape ",
                  key_cache.sym_sizes(), ") does not match query head_dim ", query.sym_size(2),
                  " (shape ", query.sym_sizes(), ")");
  TORCH_SYM_CHECK(key_cache.sym_size(1).sym_gt(0), op,
                  ": key_cache block_size must be positive, got shape ", key_cache.sym_sizes());
  TORCH_SYM_CHECK(key_cache.sym_size(2).sym_gt(0), op,
                  ": key_cache kv_heads must be positive, got shape ", key_cache.sym_sizes());
  TORCH_SYM_CHECK((query.sym_size(1) % key_cache.sym_size(2)).sym_eq(0), op,
                  ": query heads (", query.sym_size(1), ") must be a multiple of key_cache kv_heads (",
                  key_cache.sym_size(2), ")");
  check_index_tensor(block_tables, op, "block_tables", 2, "[num_requests, max_blocks]");
  check_index_tensor(query_start_loc, op, "query_start_loc", 1, "1-D [num_requests + 1]");
  check_index_tensor(seq_lens, op, "seq_lens", 1, "1-D [num_requests]");
  TORCH_SYM_CHECK(query_start_loc.sym_size(0).sym_eq(block_tables.sym_size(0) + 1), op,
                  ": query_start_loc must have num_requests + 1 = ", block_tables.sym_size(0) + 1,
                  " entries (block_tables has ", block_tables.sym_size(0), " rows), got ",
                  query_start_loc.sym_size(0));
  TORCH_SYM_CHECK(seq_lens.sym_size(0).sym_eq(block_tables.sym_size(0)), op,
                  ": seq_lens must have num_requests = ", block_tables.sym_size(0),
                  " entries (rows of block_tables), got ", seq_lens.sym_size(0));
  if (sinks.has_value()) {
    const auto& s = *sinks;
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": sinks must be float32, got ",
                s.scalar_type());
    TORCH_CHECK(s.dim() == 1, op, ": sinks must be 1-D [heads], got shape ", s.sym_sizes());
    TORCH_SYM_CHECK(s.sym_size(0).sym_eq(query.sym_size(1)), op, ": sinks must have heads = ",
                    query.sym_size(1), " entries, got ", s.sym_size(0));
    check_same_device(s, query, op, "sinks", "query");
  }
  check_same_device(out, query, op, "out", "query");
  check_same_device(key_cache, query, op, "key_cache", "query");
  check_same_device(value_cache, query, op, "value_cache", "query");
  check_same_device(block_tables, query, op, "block_tables", "query");
  check_same_device(query_start_loc, query, op, "query_start_loc", "query");
  check_same_device(seq_lens, query, op, "seq_lens", "query");
}

namespace {
void check_float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", arg,
              " must be float32, bfloat16 or float16, got ", dtype);
}
void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                      const char* ref_arg) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " (", t.scalar_type(),
              ") must have the dtype of ", ref_arg, " (", ref.scalar_type(), ")");
}
}  // namespace

void check_rms_norm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  constexpr const char* op = "rms_norm";
  check_float_dtype(input, op, "input");
  check_same_dtype(weight, input, op, "weight", "input");
  check_same_dtype(out, input, op, "out", "input");
  check_same_device(weight, input, op, "weight", "input");
  check_same_device(out, input, op, "out", "input");
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 1, op,
              ": input must be [..., hidden] and weight [hidden], got shapes ", input.sym_sizes(),
              " and ", weight.sym_sizes());
  TORCH_SYM_CHECK(weight.sym_size(0).sym_eq(input.sym_size(-1)), op, ": weight has ",
                  weight.sym_size(0), " entries but input's hidden size is ", input.sym_size(-1));
  TORCH_SYM_CHECK(c10::sym_equals(out.sym_sizes(), input.sym_sizes()), op,
                  ": out must have the shape of input ", input.sym_sizes(), ", got ",
                  out.sym_sizes());
}

void check_silu_and_mul(const at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "silu_and_mul";
  check_float_dtype(input, op, "input");
  check_same_dtype(out, input, op, "out", "input");
  check_same_device(out, input, op, "out", "input");
  TORCH_CHECK(input.dim() >= 1 && out.dim() == input.dim(), op,
              ": input must be [..., 2 * d] and out [..., d], got shapes ", input.sym_sizes(),
              " and ", out.sym_sizes());
  for (int64_t i = 0; i + 1 < input.dim(); ++i)
    TORCH_SYM_CHECK(out.sym_size(i).sym_eq(input.sym_size(i)), op, ": out ", out.sym_sizes(),
                    " and input ", input.sym_sizes(), " differ in dimension ", i);
  TORCH_SYM_CHECK((out.sym_size(-1) * 2).sym_eq(input.sym_size(-1)), op,
                  ": input's last dimension must be twice out's ([gate | up]), got input ",
                  input.sym_sizes(), " and out ", out.sym_sizes());
}

void check_rotary_embedding(const at::Tensor& positions, const at::Tensor& query,
                            const at::Tensor& key, const at::Tensor& cos_sin_cache) {
  constexpr const char* op = "rotary_embedding";
  check_index_tensor(positions, op, "positions", 1, "1-D [num_tokens]");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3, op,
              ": query must be [num_tokens, heads, head_dim] and key [num_tokens, kv_heads, "
              "head_dim], got shapes ", query.sym_sizes(), " and ", key.sym_sizes());
  TORCH_SYM_CHECK(query.sym_size(0).sym_eq(positions.sym_size(0)) &
                      key.sym_size(0).sym_eq(positions.sym_size(0)) &
                      key.sym_size(2).sym_eq(query.sym_size(2)),
                  op, ": positions ", positions.sym_sizes(), ", query ", query.sym_sizes(),
                  " and key ", key.sym_sizes(), " disagree in num_tokens or head_dim");
  check_float_dtype(query, op, "query");
  check_same_dtype(key, query, op, "key", "query");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2, op,
              ": cos_sin_cache must be float32 [max_position, rotary_dim], got ",
              cos_sin_cache.scalar_type(), " ", cos_sin_cache.sym_sizes());
  TORCH_SYM_CHECK(cos_sin_cache.sym_size(1).sym_le(query.sym_size(2)) &
                      (cos_sin_cache.sym_size(1) % 2).sym_eq(0),
                  op, ": rotary_dim = cos_sin_cache.size(1) = ", cos_sin_cache.sym_size(1),
                  " must be even and at most head_dim = ", query.sym_size(2));
  check_same_device(key, query, op, "key", "query");
  check_same_device(positions, query, op, "positions", "query");
  check_same_device(cos_sin_cache, query, op, "cos_sin_cache", "query");
}

namespace {
// input [M, K] and out [M, N] bf16, optional bias [N] and residual [M, N] bf16, all on packed's device.
void check_linear_io(const at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                     const char* op) {
  TORCH_CHECK(input.dim() == 2 && out.dim() == 2, op, ": input must be [M, K] and out [M, N], got shapes ",
              input.sym_sizes(), ", ", out.sym_sizes());
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16, op,
              ": input and out must be bfloat16, got ", input.scalar_type(), ", ", out.scalar_type());
  TORCH_SYM_CHECK(out.sym_size(0).sym_eq(input.sym_size(0)), op, ": out has ", out.sym_size(0),
                  " rows but input has ", input.sym_size(0));
  check_same_device(input, out, op, "input", "out");
  check_same_device(packed, out, op, "packed", "out");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->scalar_type() == at::kBFloat16, op,
                ": bias must be bfloat16 [N], got ", bias->scalar_type(), " ", bias->sym_sizes());
    TORCH_SYM_CHECK(bias->sym_size(0).sym_eq(out.sym_size(1)), op, ": bias has ",
                    bias->sym_size(0), " entries but out has ", out.sym_size(1), " columns");
    check_same_device(*bias, out, op, "bias", "out");
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->scalar_type() == at::kBFloat16, op,
                ": residual must be bfloat16 [M, N], got ", residual->scalar_type(), " ",
                residual->sym_sizes());
    TORCH_SYM_CHECK(residual->sym_size(0).sym_eq(out.sym_size(0)) &
                        residual->sym_size(1).sym_eq(out.sym_size(1)),
                    op, ": residual ", residual->sym_sizes(), " does not match out ", out.sym_sizes());
    TORCH_CHECK(residual->sym_size(1) == 1 || residual->sym_stride(1) == 1, op,
                ": residual rows must be dense, got strides ", residual->sym_strides());
    check_same_device(*residual, out, op, "residual", "out");
  }
}
}  // namespace

void check_linear_amx_gguf(const at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           const char* op, int64_t step_bytes) {
  check_linear_io(out, input, packed, bias, residual, op);
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte, op,
              ": packed must be uint8 [ceil(N/32), K/32, ", step_bytes, "], got ",
              packed.scalar_type(), " ", packed.sym_sizes());
  TORCH_SYM_CHECK((input.sym_size(1) % 32).sym_eq(0), op,
                  ": GGUF block weights need K % 32 == 0, got K = ", input.sym_size(1));
  TORCH_SYM_CHECK(packed.sym_size(0).sym_eq((out.sym_size(1) + 31) / 32) &
                      packed.sym_size(1).sym_eq(input.sym_size(1) / 32) &
                      packed.sym_size(2).sym_eq(step_bytes),
                  op, ": packed ", packed.sym_sizes(), " is not the packing of a [N, K] = [",
                  out.sym_size(1), ", ", input.sym_size(1), "] weight");
}

void check_linear_amx(const at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "linear_amx";
  check_linear_io(out, input, packed, bias, residual, op);
  TORCH_CHECK(packed.dim() == 5 && packed.scalar_type() == at::kBFloat16, op,
              ": packed must be bfloat16 [ceil(N/32), ceil(K/32), 2, 16, 32], got ",
              packed.scalar_type(), " ", packed.sym_sizes());
  TORCH_SYM_CHECK(packed.sym_size(0).sym_eq((out.sym_size(1) + 31) / 32) &
                      packed.sym_size(1).sym_eq((input.sym_size(1) + 31) / 32) &
                      packed.sym_size(2).sym_eq(2) & packed.sym_size(3).sym_eq(16) &
                      packed.sym_size(4).sym_eq(32),
                  op, ": packed ", packed.sym_sizes(), " is not the packing of a [N, K] = [",
                  out.sym_size(1), ", ", input.sym_size(1), "] weight (expected [",
                  (out.sym_size(1) + 31) / 32, ", ", (input.sym_size(1) + 31) / 32, ", 2, 16, 32])");
}

void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (got strides ",
              t.strides(), " for shape ", t.sizes(), ")");
}

void check_kernel_layout_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& key_cache,
                                           const at::Tensor& value_cache) {
  constexpr const char* op = "reshape_and_cache";
  check_contiguous(key_cache, op, "key_cache");
  check_contiguous(value_cache, op, "value_cache");
  // A size-1 dim may carry any stride; only the head vector itself must be dense.
  TORCH_CHECK(key.size(2) <= 1 || key.stride(2) == 1, op,
              ": key must have a unit stride on head_dim, got strides ", key.strides());
  TORCH_CHECK(value.size(2) <= 1 || value.stride(2) == 1, op,
              ": value must have a unit stride on head_dim, got strides ", value.strides());
}

void check_ids_in_range(const at::Tensor& ids, int64_t lo, int64_t hi, const char* op,
                        const char* arg, const char* range_desc) {
  const int64_t* p = ids.const_data_ptr<int64_t>();
  const int64_t n = ids.numel();
  // Serial and before any write: a bad id must not leave the cache half updated.
  for (int64_t i = 0; i < n; ++i) {
    if (C10_UNLIKELY(p[i] < lo || p[i] >= hi)) {
      const auto pos = ids.dim() == 2 ? c10::str("[", i / ids.size(1), ", ", i % ids.size(1), "]")
                                      : c10::str("[", i, "]");
      TORCH_CHECK_INDEX(false, op, ": ", arg, pos, " = ", p[i], " is out of range [", lo, ", ",
                        hi, ") ", range_desc);
    }
  }
}

int64_t block_bytes(const at::Tensor& t) {
  int64_t n = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

}  // namespace opdisagg
