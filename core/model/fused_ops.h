// The kernels of kernels/ for at::Tensor: the fused RMSNorm, residual add + RMSNorm, RoPE and
// SiLU gate of kernels/norm_rope.h (used by Transformer::Run on CUDA), the weight GEMV of the
// decode step's projections, the decode step's append and split-KV attention, and the projected
// value norm of the presses. Each entry says whether it covered the case; when it did not (a CPU
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

// x = x + delta in place, rounded as ATen's add rounds it, then y = the RMSNorm of the new x with
// weight w [n], bit for bit what FusedRmsNormOut writes for it; one launch. x, delta: the same
// shape [..., n], contiguous; delta 16-byte aligned (any fresh ATen tensor is). y: x's shape,
// contiguous, or undefined and then allocated here when covered. x, delta, w and y must not
// overlap (checked: not covered otherwise). When not covered, x and y are untouched and the
// caller runs x = x + delta; RmsNorm(x, w).
bool FusedAddRmsNormInPlace(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps, at::Tensor& y);

// at::silu(g) * u for gu = [g | u] split along its last dim ([..., 2 * inter], contiguous, the
// gate/up projection), rounded as ATen rounds the two ops, into `out` ([..., inter] contiguous,
// gu's dtype, not overlapping gu).
bool FusedSiluMulOut(const at::Tensor& gu, at::Tensor& out);
// The same into a new tensor; undefined when not covered.
at::Tensor FusedSiluMul(const at::Tensor& gu);

// x = x * cos + rotate_half(x) * sin in place, rounded as Rope::Apply rounds it. x: [T, H, D],
// contiguous last dim, D even, other strides free as long as no two (t, h) rows overlap;
// cos, sin: [T, D] contiguous, x's dtype.
bool FusedRopeInPlace(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// at::linear(x, w, b) for at most kernels::kGemvMaxRows (8) rows of x through the GEMV of
// kernels/gemv.h: it streams w with 16-byte read-only loads on the tensor cores where cuBLAS runs
// a general GEMM. Transformer::RunLayer and Head use it where it was measured faster (one row,
// weights up to 512 MiB: the projections of a batch-1 decode step, not the lm_head). Its own switch, read once from DEFKV_GEMV_KERNEL when first
// asked: on unless it is 0 (then cuBLAS); the fused switch turns it off too. Benchmarks
// (defkv-bench --gemv-sweep) and tests set it.
void SetGemvKernel(bool on);
bool GemvKernelEnabled();

// x: [..., K] contiguous with at most 8 rows (numel / K), K a multiple of 8; w: [N, K]
// contiguous; b: [N] contiguous or undefined; one half-precision dtype on one device, x and w
// 16-byte aligned. Returns [..., N] contiguous in x's dtype (fp32 sums, rounded once), or
// undefined when not covered: CPU, a switch off, fp32, no rows or more than 8, a layout or
// alignment the kernel does not take.
at::Tensor FusedLinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// FusedSiluMul(FusedLinear(x, w, b)) in one kernel (kernels/gemv.h GemvSiluGate): w is the fused
// gate/up weight [2 * inter, K], b [2 * inter] or undefined; returns [..., inter], the same bits
// as the two calls, or undefined when either would decline (the GEMV and fused switches both on).
at::Tensor FusedLinearSiluGate(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// Programmatic dependent launch of the kernels above (kernels/launch.cuh): on where the device
// takes it (sm_90 and newer) unless DEFKV_PDL=0 is set when first asked (kernels/device_info.h).
// Tests and benchmarks set it.
void SetDependentLaunch(bool on);
bool DependentLaunchEnabled();

// The split-KV decode attention of kernels/decode_attention.h, used by
// HeadwiseCache::AttendPlanned in place of the varlen flash call: on an H200 it streams K/V at
// 3.3-3.7 TB/s from 256 segments up where flash falls to 2.0-2.3, and matches flash (within
// about 8%, either way) below (docs/PERFORMANCE.md, defkv-bench --attn-sweep). Its own switch,
// read once from DEFKV_DECODE_KERNEL when first asked: on unless it is 0 (then flash). Tests and
// benchmarks set it.
void SetDecodeKernel(bool on);
bool DecodeKernelEnabled();
// The kernel's chunking (kernels::DecodeAttentionTuning), for benchmarks that sweep it; {0, 0}
// restores the defaults.
void SetDecodeAttentionTuning(int64_t min_chunk, int64_t blocks_per_sm);

// One query token per segment: segment j = t * H + h (H = `heads` kv heads per token) is rows
// [seg_start[j], seg_start[j] + seg_len[j]) of k_pool and v_pool ([rows, D] contiguous), read by
// query heads h * G .. h * G + G - 1 of token t:
//   out[t, h * G + g] = softmax(scale * q[t, h * G + g] . K_j^T) V_j,  zeros when seg_len[j] = 0.
// q: [T, H * G, D] with rows of D contiguous and heads adjacent (a view of the qkv projection
// is fine); seg_start, seg_len: int32 [T * H] contiguous on q's device; max_len bounds every
// seg_len (the launch depends on it and the sizes only, so a CUDA graph stays valid while lengths
// grow up to it). Returns [T, H * G, D] contiguous in q's dtype, or undefined when not covered
// (CPU, the switch off, a dtype, D or layout the kernel does not take).
at::Tensor FusedDecodeAttention(const at::Tensor& q, int64_t heads, const at::Tensor& k_pool,
                                const at::Tensor& v_pool, const at::Tensor& seg_start, const at::Tensor& seg_len,
                                int64_t max_len, double scale);

// The decode step's append (kernels/kv_append.h): k_pool[rows[t * H + h]] = k[t, h], likewise v.
// k, v: [T, H, D] with rows of D contiguous (views of the projection are fine); rows: int64
// [T * H] contiguous on their device; pools [rows, D] contiguous. False (nothing written) when
// not covered: CPU, the fused switch off, a dtype or alignment the kernel does not take.
bool FusedAppendRows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows, const at::Tensor& k_pool,
                     const at::Tensor& v_pool);

// The decode step's RoPE and append in one launch (kernels/norm_rope.h RopeAppend): q rotated in
// place as FusedRopeInPlace rotates it, and k rotated the same way into k_pool[rows[t * H + h]],
// v copied into v_pool[rows[...]] (k itself is left unrotated). q [T, H_q, D], k and v [T, H, D]
// must be the heads of one qkv projection row, side by side (Transformer::RunLayer's views);
// cos, sin [T, D]; rows, pools as FusedAppendRows. False (nothing written) when not covered: the
// fused switch or its own switch off, another layout, a dtype or alignment the kernel does not
// take.
bool FusedRopeAppend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& rows, const at::Tensor& k_pool, const at::Tensor& v_pool);

// FusedRopeAppend's switch, read once from DEFKV_ROPE_APPEND when first asked: on unless it is 0
// (then the RoPE kernel and the append kernel). Tests and benchmarks set it.
void SetRopeAppend(bool on);
bool RopeAppendEnabled();

// The projected value norm of kernels/value_norm.h, used by press::ProjectedValueNorm (the
// DefensiveKV and CriticalKV output-projection weighting):
//   out[h, t] = sum_e | sum_c values[h / (hq / H_kv), t, c] * w_o[e, h * D + c] |
// values: [H_kv, n, D] with contiguous rows (row stride D) and any head stride that is a
// multiple of 8 elements (the first n tokens of a layer's cache); w_o: o_proj.weight
// [hidden, hq * D] contiguous, values' dtype. Returns [hq, n] fp32 (each element rounded once
// to the input dtype), or undefined when not covered: CPU, switch off, fp32, D not in
// {64, 128, 256}, hidden not a multiple of 64, a pointer not 16-byte aligned.
at::Tensor FusedValueNorm(const at::Tensor& values, const at::Tensor& w_o, int64_t hq);

}  // namespace defkv::model
