// The fused RMSNorm and RoPE kernels of kernels/norm_rope.h for at::Tensor, used by
// Transformer::Run on CUDA. Each entry says whether it covered the case; when it did not (a CPU
// tensor or build, the switch off, a layout the kernel does not take) it touched nothing and the
// caller runs the ATen expression, which stays the CPU reference. Launches go on the current
// stream and allocate only through ATen, so a CUDA graph can capture them.
#pragma once

#include <ATen/ATen.h>

namespace defkv::model {

// On unless DEFKV_FUSED_KERNELS=0 is set when first asked (read once: A/B benchmarks). Tests
// flip it to compare both paths in one process.
void SetFusedKernels(bool on);
bool FusedKernelsEnabled();

// RMSNorm over the last dim of x with weight w [n] (same dtype), as Transformer::RmsNorm
// computes it, into `out` (contiguous, x's shape and dtype). x: [rows, n] or [A, B, n] with a
// contiguous last dim and any other strides (a [T, H, D] view of the qkv projection), or any
// contiguous shape.
bool FusedRmsNormOut(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out);
// The same into a new tensor; undefined when not covered.
at::Tensor FusedRmsNorm(const at::Tensor& x, const at::Tensor& w, double eps);

// x = x * cos + rotate_half(x) * sin in place, rounded as Rope::Apply rounds it. x: [T, H, D],
// contiguous last dim, D even, other strides free as long as no two (t, h) rows overlap;
// cos, sin: [T, D] contiguous, x's dtype.
bool FusedRopeInPlace(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// The split-KV decode attention of kernels/decode_attention.h, used by
// HeadwiseCache::AttendPlanned in place of the varlen flash call. Its own switch: off unless
// DEFKV_DECODE_KERNEL=1 is set when first asked (read once; it has not run on a GPU yet); tests
// flip it.
void SetDecodeKernel(bool on);
bool DecodeKernelEnabled();

// One query token per segment: out[j, g] = softmax(scale * qp[j, g] . K_j^T) V_j, where segment
// j is rows [seg_start[j], seg_start[j] + seg_len[j]) of k_pool and v_pool ([rows, D]
// contiguous), zeros when seg_len[j] = 0. qp: [n, G, D] contiguous; seg_start, seg_len: int32
// [n] contiguous on qp's device; max_len bounds every seg_len (the launch depends on it and n
// only, so a CUDA graph stays valid while lengths grow up to it). Returns [n, G, D] in qp's
// dtype, or undefined when not covered (CPU, switch off, dtype or D the kernel does not take).
at::Tensor FusedDecodeAttention(const at::Tensor& qp, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                const at::Tensor& seg_start, const at::Tensor& seg_len, int64_t max_len,
                                double scale);

}  // namespace defkv::model
