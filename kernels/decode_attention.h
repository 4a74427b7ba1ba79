// Split-KV ("flash-decoding") attention for the batched decode step: one query token per
// segment, each segment a run of K/V rows of a shared pool. Replaces the varlen flash call of
// HeadwiseCache::AttendPlanned (wrapped for at::Tensor in core/model/fused_ops.h).
//
// Segment j = t * heads + h (token t's kv head h) holds rows [seg_start[j], seg_start[j] +
// seg_len[j]) of k_pool and v_pool ([rows, D] contiguous, one dtype). The queries are read in
// place from the projection: token t's query heads [heads * G, D] start at q + t *
// q_token_stride (rows of D contiguous), and kv head h is read by query heads h * G .. h * G + G
// - 1 (a contiguous [n, G, D] tensor is heads = 1, q_token_stride = G * D). For every (j, g):
//   out[j, g] = softmax(scale * q[j, g] . K_j^T) V_j    (fp32 math, rounded to the dtype once)
// into out [n, G, D] contiguous (= [tokens, heads * G, D]), and zeros for a segment of length 0.
//
// Two launches: each segment is cut into `splits` chunks of equal size (a function of max_len
// and n only, never of the lengths, so a CUDA graph captured with a bound max_len stays valid as
// the segments grow up to it); one block per (segment, chunk) writes its normalized partial
// output and log-sum-exp to the fp32 scratch, and a second kernel merges the chunks. When
// splits == 1 the first kernel writes `out` itself. A segment longer than max_len is still
// attended in full (its last chunk runs to the end), only slower.
//
// `tuning` sets the chunking (benchmarks sweep it; the defaults are the measured best on an H200).
// Pointers are device memory; q (and q_token_stride's bytes), k_pool, v_pool, out must be 16-byte aligned. `stream` is a
// cudaStream_t. Nothing is allocated and nothing waits on the host. Returns 0 or the CUDA error
// code (cudaErrorInvalidValue for sizes or layouts the kernels do not take).
#pragma once

#include <cstdint>

#include "kernels/norm_rope.h"  // DType, CudaErrorString

namespace defkv::kernels {

#ifdef DEFKV_WITH_CUDA

// A segment is cut into chunks of at least min_chunk keys (rounded up to 64), as many as make
// about blocks_per_sm blocks per SM over all segments. Zero (the default) picks by the number of
// segments, as measured on an H200 (defkv-bench --attn-sweep, docs/PERFORMANCE.md): a batch of
// requests (256 segments or more) takes 128 and 64, fewer segments 256 and 16.
struct DecodeAttentionTuning {
  int64_t min_chunk = 0;
  int64_t blocks_per_sm = 0;
};

// The chunks per segment DecodeAttention uses for this bound on the segment length (>= 1):
// the partial_out scratch is [n, splits, G, D] floats and partial_lse [n, splits, G].
int DecodeAttentionSplits(int64_t max_len, int64_t segments, int num_sms, const DecodeAttentionTuning& tuning = {});

// Whether DecodeAttention takes this (dtype, G, D): G in 1..8; D in {64, 128, 256} for
// fp16/bf16, {64, 128} for fp32.
bool DecodeAttentionSupported(DType dtype, int64_t G, int64_t D);

int DecodeAttention(DType dtype, const void* q, int64_t heads, int64_t q_token_stride, const void* k_pool,
                    const void* v_pool, const int32_t* seg_start, const int32_t* seg_len, int64_t n, int64_t G,
                    int64_t D, int64_t max_len, float scale, float* partial_out, float* partial_lse, void* out,
                    int num_sms, void* stream, const DecodeAttentionTuning& tuning = {});

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::kernels
