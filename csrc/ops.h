// Shared declarations for the opdisagg ops: argument checks used by every backend (CPU, CUDA,
// Meta) and the CPU-side helpers. Torch-facing; the CUDA kernels never include this file.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace opdisagg {

// Metadata checks (rank, sizes, dtypes, devices). They compare SymInts so the same code serves
// the Meta kernels under dynamic shapes, and they never read tensor data (no device sync).
void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& key_cache, const at::Tensor& value_cache,
                             const at::Tensor& slot_mapping);
void check_copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                       const at::Tensor& block_mapping);
void check_gather_blocks(const at::Tensor& cache, const at::Tensor& block_ids);
void check_scatter_blocks(const at::Tensor& buffer, const at::Tensor& cache,
                          const at::Tensor& block_ids);
void check_paged_attention(const at::Tensor& out, const at::Tensor& query,
                           const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                           const at::Tensor& seq_lens, const std::optional<at::Tensor>& sinks);
void check_rms_norm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);
void check_silu_and_mul(const at::Tensor& out, const at::Tensor& input);
void check_rotary_embedding(const at::Tensor& positions, const at::Tensor& query,
                            const at::Tensor& key, const at::Tensor& cos_sin_cache);
// residual (optional, bf16 [M, N]): out = residual + the projection, each rounded to bf16.
void check_linear_amx(const at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual);
// GGUF packings (linear_amx_q4_1 / _q8_0): packed is uint8 [ceil(N/32), K/32, step_bytes].
void check_linear_amx_gguf(const at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           const char* op, int64_t step_bytes);

// Whether this CPU and OS run the AMX-BF16 linear kernel (csrc/cpu/linear_amx.cpp).
bool amx_available();

// Layout checks for the real kernels: caches are written by flat block/slot offsets, so they
// must be contiguous; K/V rows may be strided (slices of a fused QKV output) but each head's
// vector must be dense.
void check_kernel_layout_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& key_cache,
                                           const at::Tensor& value_cache);
void check_contiguous(const at::Tensor& t, const char* op, const char* arg);

// Raises naming `op`, `arg`, the first bad position and value if any id of the contiguous CPU
// int64 tensor `ids` lies outside [lo, hi).
void check_ids_in_range(const at::Tensor& ids, int64_t lo, int64_t hi, const char* op,
                        const char* arg, const char* range_desc);

// Bytes of one leading-dim slice (one block) of a contiguous tensor; valid when size(0) == 0.
int64_t block_bytes(const at::Tensor& t);

}  // namespace opdisagg
