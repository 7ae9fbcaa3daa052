// C interface of the CUDA paged-KV copy kernels (csrc/cuda/cache_kernels.cu).
//
// Plain C over raw pointers and the CUDA runtime: no torch headers, so the .cu file compiles
// with a bare nvcc (the CPU torch wheel ships incomplete CUDA headers) and tests keep it building.
// Strides and sizes are in elements of `elem_size` bytes; index arrays are int64 on the device.
// Out-of-range ids are skipped on the device (checking them on the host would need a sync);
// the CPU twins of these ops raise on them instead.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// key/value: [num_tokens, num_heads, head_dim] with strides (token_stride, head_stride, 1);
// caches: contiguous [num_slots / block_size, block_size, num_heads, head_dim].
cudaError_t opdisagg_reshape_and_cache_launch(
    const void* key, const void* value, void* key_cache, void* value_cache,
    const int64_t* slot_mapping, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
    int64_t key_token_stride, int64_t key_head_stride, int64_t value_token_stride,
    int64_t value_head_stride, int64_t num_slots, int elem_size, cudaStream_t stream);

// caches_host / caches_dev: the same table [num_caches][3] = {base address, bytes per block,
// num_blocks}, on the host (to pick the copy width) and on the device (read by the kernel).
// block_mapping: [num_pairs, 2] (src, dst), applied to every cache.
cudaError_t opdisagg_copy_blocks_launch(const int64_t* caches_host, const int64_t* caches_dev,
                                        int64_t num_caches, const int64_t* block_mapping,
                                        int64_t num_pairs, cudaStream_t stream);

// out[i] = cache[block_ids[i]]; blocks of block_numel elements, both tensors contiguous.
cudaError_t opdisagg_gather_blocks_launch(const void* cache, void* out, const int64_t* block_ids,
                                          int64_t num_ids, int64_t block_numel,
                                          int64_t num_blocks, int elem_size, cudaStream_t stream);

// cache[block_ids[i]] = buffer[i].
cudaError_t opdisagg_scatter_blocks_launch(const void* buffer, void* cache, const int64_t* block_ids,
                                           int64_t num_ids, int64_t block_numel,
                                           int64_t num_blocks, int elem_size, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
