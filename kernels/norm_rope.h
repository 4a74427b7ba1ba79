// Fused RMSNorm and in-place RoPE for the decode step: one launch each where ATen needs about
// ten small kernels (CUDA graphs still pay ~2 us per kernel). Both reproduce the ATen
// expressions they replace, whose CPU runs are the reference: Transformer::RmsNorm and
// Rope::Apply in core/model (wrapped for at::Tensor in core/model/fused_ops.h).
//
// RmsNorm reads rows of x [outer, inner, n] (element strides stride_outer, stride_inner, 1; a
// plain matrix is inner = 1) and w [n], and writes y [outer * inner, n] contiguous:
//   y = T(float(w) * float(T(xf * rsqrt(mean(xf^2) + eps)))),  xf = float(x), T = the dtype.
// RopeInPlace rotates x [tokens, heads, head_dim] (element strides stride_t, stride_h, 1) in
// place with cos, sin [tokens, head_dim] contiguous, as ATen's x * cos + rotate_half(x) * sin
// rounds it: each product rounded to T, then their float sum rounded to T.
//
// Pointers are device memory of one dtype; `stream` is a cudaStream_t. Nothing is allocated and
// nothing waits on the host, so both can be captured in a CUDA graph. They return 0 or the CUDA
// error code of the launch (cudaErrorInvalidValue for sizes the kernels do not take).
#pragma once

#include <cstdint>
#include <string>

namespace defkv::kernels {

#ifdef DEFKV_WITH_CUDA

enum class DType { kFloat32, kFloat16, kBFloat16 };

int RmsNorm(DType dtype, const void* x, int64_t outer, int64_t inner, int64_t n, int64_t stride_outer,
            int64_t stride_inner, const void* w, float eps, void* y, void* stream);

// head_dim must be even.
int RopeInPlace(DType dtype, void* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride_t,
                int64_t stride_h, const void* cos, const void* sin, void* stream);

// cudaGetErrorString of a code returned above.
std::string CudaErrorString(int code);

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::kernels
