// The append of a decode step: every (token, kv head) pair's new key and value row written to
// its row of the shared pool, one launch for both (ATen needs a transpose copy and an
// index_copy_ for each). Used by HeadwiseCache::AttendPlanned (wrapped for at::Tensor in
// core/model/fused_ops.h); the index_copy_ it replaces is the reference.
//
// For j = t * heads + h:  k_pool[rows[j]] = k[t, h],  v_pool[rows[j]] = v[t, h]   (D elements),
// where k[t, h] starts at k + t * k_token_stride + h * k_head_stride (elements; rows of D
// contiguous), likewise v. The pools are [rows, D] contiguous. Rows are copied whole in 16-byte
// pieces: every pointer, stride and D * element size must be multiples of 16 bytes.
//
// Pointers are device memory of one dtype (rows: int64); `stream` is a cudaStream_t. Nothing is
// allocated and nothing waits on the host (CUDA graphs capture it). Returns 0 or the CUDA error
// code (cudaErrorInvalidValue for a layout it does not take).
#pragma once

#include <cstdint>

#include "kernels/norm_rope.h"  // DType, CudaErrorString

namespace defkv::kernels {

#ifdef DEFKV_WITH_CUDA

int AppendRows(DType dtype, const void* k, int64_t k_token_stride, int64_t k_head_stride, const void* v,
               int64_t v_token_stride, int64_t v_head_stride, int64_t tokens, int64_t heads, int64_t D,
               const int64_t* rows, void* k_pool, void* v_pool, void* stream);

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::kernels
