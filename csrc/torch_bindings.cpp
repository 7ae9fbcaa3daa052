// Schemas of the opdisagg ops, their Meta kernels, and the Python module init of opdisagg_rt._C.
//
// The ops go through the dispatcher (TORCH_LIBRARY) rather than pybind11 so they are callable as
// torch.ops.opdisagg.*, traceable by torch.compile, and have one schema shared by CPU and CUDA.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops.h"

namespace opdisagg {
namespace {

// Meta kernels: shape/dtype checks plus the output shape, nothing else. Used by FakeTensor
// (torch.compile, opcheck) and written with SymInts so dynamic shapes work.
void reshape_and_cache_meta(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
}

void copy_blocks_meta(at::TensorList key_caches, at::TensorList value_caches,
                      const at::Tensor& block_mapping) {
  check_copy_blocks(key_caches, value_caches, block_mapping);
}

at::Tensor gather_blocks_meta(const at::Tensor& cache, const at::Tensor& block_ids) {
  check_gather_blocks(cache, block_ids);
  auto sizes = cache.sym_sizes().vec();
  sizes[0] = block_ids.sym_size(0);
  return at::empty_symint(sizes, cache.options());
}

void scatter_blocks_meta(const at::Tensor& buffer, at::Tensor& cache, const at::Tensor& block_ids) {
  check_scatter_blocks(buffer, cache, block_ids);
}

void paged_attention_meta(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_tables,
                          const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                          double /*scale*/, int64_t /*window*/,
                          const std::optional<at::Tensor>& sinks) {
  check_paged_attention(out, query, key_cache, value_cache, block_tables, query_start_loc,
                        seq_lens, sinks);
}

void rms_norm_meta(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                   double /*epsilon*/) {
  check_rms_norm(out, input, weight);
}

void silu_and_mul_meta(at::Tensor& out, const at::Tensor& input) { check_silu_and_mul(out, input); }

void rotary_embedding_meta(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                           const at::Tensor& cos_sin_cache, bool /*is_neox*/) {
  check_rotary_embedding(positions, query, key, cos_sin_cache);
}

void linear_amx_meta(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_linear_amx(out, input, packed, bias, residual);
}

void linear_amx_q4_1_meta(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_linear_amx_gguf(out, input, packed, bias, residual, "linear_amx_q4_1", 640);
}

void linear_amx_q8_0_meta(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_linear_amx_gguf(out, input, packed, bias, residual, "linear_amx_q8_0", 1088);
}

}  // namespace
}  // namespace opdisagg

TORCH_LIBRARY(opdisagg, m) {
  // Write each token's K/V rows into the paged caches at slot = block * block_size + offset;
  // slot -1 (padding, or a token whose KV is not cached) is skipped.
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache,"
      " Tensor slot_mapping) -> ()");
  // Copy whole blocks src -> dst in every layer's K and V cache (copy-on-write of shared blocks).
  m.def("copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor block_mapping) -> ()");
  // Paged blocks <-> one contiguous buffer, for offload to the KV store and for transfer.
  m.def("gather_blocks(Tensor cache, Tensor block_ids) -> Tensor");
  m.def("scatter_blocks(Tensor buffer, Tensor(a!) cache, Tensor block_ids) -> ()");
  // Attention of query rows [T, H, D] over the paged caches, written into out [T, H, D].
  // Request r owns query rows query_start_loc[r]:query_start_loc[r+1]; its j-th row sits at
  // position seq_lens[r] - n_r + j and attends keys [0, p] (or the last `window` of them when
  // window > 0), read through block_tables[r]. sinks: optional float32 [H] per-head logit that
  // joins the softmax denominator only (gpt-oss). GQA: head h reads kv head h / (H / KVH).
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache,"
      " Tensor block_tables, Tensor query_start_loc, Tensor seq_lens, float scale, int window,"
      " Tensor? sinks) -> ()");
  // out = weight * x / sqrt(mean(x^2) + epsilon) over the last dimension (float32 math; bf16
  // rounded after normalizing and after the weight, as transformers' Llama norm).
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) -> ()");
  // out = silu(input[..., :d]) * input[..., d:] with out [..., d] (SwiGLU's gate and up halves).
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  // Rotates, in place, the first rotary_dim = cos_sin_cache.size(1) dims of every head of query
  // [T, H, D] and key [T, KVH, D] by the float32 table row [cos | sin] of each token's position.
  // is_neox: pairs (i, i + rotary_dim / 2) (rotate_half, Llama); else (2i, 2i + 1) (GPT-J).
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache,"
      " bool is_neox) -> ()");
  // out [M, N] = input [M, K] @ W^T (+ bias), bf16, W prepacked for AMX tiles into
  // [ceil(N/32), ceil(K/32), 2, 16, 32] (see csrc/cpu/linear_amx.cpp). CPU with AMX-BF16 only.
  m.def("linear_amx(Tensor(a!) out, Tensor input, Tensor packed, Tensor? bias, Tensor? residual=None) -> ()");
  // The same with a GGUF Q4_1 weight kept 4-bit in memory, packed into uint8
  // [ceil(N/32), K/32, 640] and expanded to bf16 tile by tile (bit-identical to the loader's
  // bf16 dequantization).
  m.def("linear_amx_q4_1(Tensor(a!) out, Tensor input, Tensor packed, Tensor? bias, Tensor? residual=None) -> ()");
  // ... and a GGUF Q8_0 weight, packed into uint8 [ceil(N/32), K/32, 1088].
  m.def("linear_amx_q8_0(Tensor(a!) out, Tensor input, Tensor packed, Tensor? bias, Tensor? residual=None) -> ()");
  // One decode token per row n of a linear-attention layer, updating the float32 state row
  // state[state_indices[n]] ([num_slots, H, d_k, d_v]) in place; out [N, H, d_v] = q S (new S).
  // Lightning (MiniMax): S = decay[h] * S + k^T v, decay = exp(-slope) float32 [H].
  m.def(
      "lightning_attention_decode(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor(b!) state,"
      " Tensor state_indices, Tensor decay) -> ()");
  // Gated delta rule (Qwen3-Next): q, k [N, HK, d_k] (L2-normalised when use_qk_l2norm, q times
  // scale; value head h reads key head h / (H / HK)), g, beta float32 [N, H]:
  // S = exp(g) S; S += k^T (beta (v - k S)); out = q S. csrc/cpu/linear_attention.cpp.
  m.def(
      "gated_delta_rule_decode(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor g,"
      " Tensor beta, Tensor(b!) state, Tensor state_indices, float scale, bool use_qk_l2norm)"
      " -> ()");
  // Decode step of a causal depthwise conv1d (Qwen3-Next's short convolution), in place on the
  // float32 conv_state [num_slots, C, kernel - 1] (the last inputs): out [N, C] =
  // sum_j weight[:, j] * [conv_state[state_indices[n]] | x[n]][:, j] (no activation), then the
  // slot's state drops its oldest input and appends x[n]. weight float32 [C, kernel].
  m.def(
      "causal_conv1d_update(Tensor(a!) out, Tensor x, Tensor(b!) conv_state, Tensor weight,"
      " Tensor state_indices) -> ()");
  // Whether linear_amx can run here (CPU flags, OS permission, OPDISAGG_AMX != 0).
  m.def("amx_available() -> bool", &opdisagg::amx_available);
}

TORCH_LIBRARY_IMPL(opdisagg, Meta, m) {
  m.impl("reshape_and_cache", &opdisagg::reshape_and_cache_meta);
  m.impl("copy_blocks", &opdisagg::copy_blocks_meta);
  m.impl("gather_blocks", &opdisagg::gather_blocks_meta);
  m.impl("scatter_blocks", &opdisagg::scatter_blocks_meta);
  m.impl("paged_attention", &opdisagg::paged_attention_meta);
  m.impl("rms_norm", &opdisagg::rms_norm_meta);
  m.impl("silu_and_mul", &opdisagg::silu_and_mul_meta);
  m.impl("rotary_embedding", &opdisagg::rotary_embedding_meta);
  m.impl("linear_amx", &opdisagg::linear_amx_meta);
  m.impl("linear_amx_q4_1", &opdisagg::linear_amx_q4_1_meta);
  m.impl("linear_amx_q8_0", &opdisagg::linear_amx_q8_0_meta);
}

// A bare module: importing opdisagg_rt._C runs the static registrations above; Python reaches
// the ops through torch.ops.opdisagg, so the module itself exports nothing.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "opdisagg_rt C++ ops", -1, nullptr, nullptr, nullptr, nullptr,
      nullptr};
  return PyModule_Create(&module_def);
}
