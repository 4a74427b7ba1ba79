// Split-KV ("flash-decoding") attention for the batched decode step: one query token per
// segment, each segment a run of K/V rows of a shared pool. Replaces the varlen flash call of
// HeadwiseCache::AttendPlanned (wrapped for at::Tensor in core/model/fused_ops.h).
//
// Segment j (one (sequence, kv head) pair) holds rows [seg_start[j], seg_start[j] + seg_len[j])
// of k_pool and v_pool ([rows, D] contiguous, one dtype). q [n, G, D] holds the G query heads
// reading it. For every (j, g):
//   out[j, g] = softmax(scale * q[j, g] . K_j^T) V_j    (fp32 math, rounded to the dtype once)
// and zeros for a segment of length 0.
//
// Two launches: each segment is cut into `splits` chunks of equal size (a function of max_len
// and n only, never of the lengths, so a CUDA graph captured with a bound max_len stays valid as
// the segments grow up to it); one block per (segment, chunk) writes its normalized partial
// output and log-sum-exp to the fp32 scratch, and a second kernel merges the chunks. When
// splits == 1 the first kernel writes `out` itself. A segment longer than max_len is still
// attended in full (its last chunk runs to the end), only slower.
//
// Pointers are device memory; q, k_pool, v_pool, out must be 16-byte aligned. `stream` is a
// cudaStream_t. Nothing is allocated and nothing waits on the host. Returns 0 or the CUDA error
// code (cudaErrorInvalidValue for sizes or layouts the kernels do not take).
#pragma once

#include <cstdint>

#include "kernels/norm_rope.h"  // DType, CudaErrorString

namespace defkv::kernels {

#ifdef DEFKV_WITH_CUDA

// The chunks per segment DecodeAttention uses for this bound on the segment length (>= 1):
// the partial_out scratch is [n, splits, G, D] floats and partial_lse [n, splits, G].
int DecodeAttentionSplits(int64_t max_len, int64_t segments, int num_sms);

// Whether DecodeAttention takes this (dtype, G, D): G in 1..8; D in {64, 128, 256} for
// fp16/bf16, {64, 128} for fp32.
bool DecodeAttentionSupported(DType dtype, int64_t G, int64_t D);

int DecodeAttention(DType dtype, const void* q, const void* k_pool, const void* v_pool, const int32_t* seg_start,
                    const int32_t* seg_len, int64_t n, int64_t G, int64_t D, int64_t max_len, float scale,
                    float* partial_out, float* partial_lse, void* out, int num_sms, void* stream);

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::kernels
