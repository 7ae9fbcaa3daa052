// C interface of the CUDA row-wise kernels (csrc/cuda/elementwise_kernels.cu): rms_norm,
// silu_and_mul, rotary_embedding. They are the CUDA twins of csrc/cpu/elementwise.cpp. The math
// is the same: float32 arithmetic, with bf16/fp16 results rounded at the same points.
//
// Plain C over raw pointers and the CUDA runtime: no torch headers, so the .cu file compiles
// with a bare nvcc (the CPU torch wheel ships incomplete CUDA headers) and tests keep it building.
// Sizes and strides are in elements of the storage dtype `kind`; the last dimension of every
// tensor is dense (unit stride). Positions are int64 on the device.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Storage dtype of the activations (and of rms_norm's weight).
typedef enum opdisagg_elem_kind {
  OPDISAGG_ELEM_F32 = 0,
  OPDISAGG_ELEM_BF16 = 1,
  OPDISAGG_ELEM_F16 = 2,
} opdisagg_elem_kind;

// out[r] = weight * round(x[r] * rsqrt(mean(x[r]^2) + epsilon)), for r < rows. x and out are
// [rows, hidden] with row strides input_row_stride and out_row_stride; weight is dense [hidden].
cudaError_t opdisagg_rms_norm_launch(void* out, const void* input, const void* weight,
                                     int64_t rows, int64_t hidden, int64_t out_row_stride,
                                     int64_t input_row_stride, float epsilon,
                                     opdisagg_elem_kind kind, cudaStream_t stream);

// out[r] = round(silu(input[r, :d])) * input[r, d:2d], for r < rows. input is [rows, 2 * d] and
// out is [rows, d], with row strides input_row_stride and out_row_stride.
cudaError_t opdisagg_silu_and_mul_launch(void* out, const void* input, int64_t rows, int64_t d,
                                         int64_t out_row_stride, int64_t input_row_stride,
                                         opdisagg_elem_kind kind, cudaStream_t stream);

// In place on query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads,
// head_dim], with strides (token_stride, head_stride, 1). The first rotary_dim dims of each head
// rotate by row positions[t] of the dense float32 table cos_sin_cache
// [max_position, rotary_dim] = [cos | sin]. is_neox != 0 pairs dims (i, i + rotary_dim / 2);
// otherwise the pairs are (2i, 2i + 1) (GPT-J). rotary_dim must be even.
// Tokens whose position is outside [0, max_position) are left unrotated on the device. Checking
// positions on the host would need a sync. The CPU twin raises on them instead.
cudaError_t opdisagg_rotary_embedding_launch(
    const int64_t* positions, void* query, void* key, const float* cos_sin_cache,
    int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t rotary_dim,
    int64_t query_token_stride, int64_t query_head_stride, int64_t key_token_stride,
    int64_t key_head_stride, int64_t max_position, int is_neox, opdisagg_elem_kind kind,
    cudaStream_t stream);

#ifdef __cplusplus
}
#endif
