// The projected value norm of DefensiveKV and CriticalKV (spec/presses.md §3 (e), §6.4 vw_l1norm):
//   out[h, t] = sum_{e < hidden} | sum_{c < D} V[g(h), t, c] * w_o[e, h * D + c] |
// for every query head h < hq and token t < n, with g(h) = h / (hq / kv_heads) (GQA). This is a
// skinny GEMM per head ([n, D] x [D, hidden]) followed by an L1 norm of each product row; the
// kernel never writes the [n, hidden] product (the ATen path in core/press/common.cpp,
// ProjectedValueNorm, does, block by block, and stays the CPU reference).
//
// v: [kv_heads, n, D] of one dtype, head stride `stride_head` elements, rows contiguous (row
// stride D): the first n tokens of a layer's values, whose head stride is the cache's capacity.
// w_o: o_proj.weight [hidden, hq * D], row-major contiguous, v's dtype. out: [hq, n] fp32
// contiguous. Accumulation is fp32; each out element is the fp32 sum rounded once to the dtype
// (stored back as a float): the Triton kernel stores its result in the input dtype, and so does
// the ATen path's bf16/fp16 sum.
//
// Pointers are device memory; `stream` is a cudaStream_t. Nothing is allocated and nothing waits
// on the host. Returns 0 or the CUDA error code of the launch; cudaErrorInvalidValue for what the
// kernel does not take: a (dtype, D) outside ValueNormSupported, hidden not a positive multiple
// of 64, hq not a multiple of kv_heads, v or w_o not 16-byte aligned, or stride_head not a
// multiple of 8 elements. Callers check these first and fall back to ATen.
#pragma once

#include <cstdint>

#include "kernels/norm_rope.h"  // DType, CudaErrorString

namespace defkv::kernels {

#ifdef DEFKV_WITH_CUDA

// fp16 and bf16 (tensor cores) with D in {64, 128, 256}; fp32 is not taken.
bool ValueNormSupported(DType dtype, int64_t D);

int ValueNormL1(DType dtype, const void* v, int64_t kv_heads, int64_t n, int64_t stride_head, const void* w_o,
                int64_t hq, int64_t D, int64_t hidden, float* out, void* stream);

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::kernels
