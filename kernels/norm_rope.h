// Fused RMSNorm, residual add + RMSNorm, in-place RoPE and SiLU gate for the decode step: one
// launch each where ATen needs two to ten small kernels (CUDA graphs still pay ~2 us per
// kernel). Each reproduces the ATen expressions it replaces, whose CPU runs are the reference:
// Transformer::RmsNorm, Rope::Apply and the residual adds and MLP gate of Transformer::Run in
// core/model (wrapped for at::Tensor in core/model/fused_ops.h).
//
// RmsNorm reads rows of x [outer, inner, n] (element strides stride_outer, stride_inner, 1; a
// plain matrix is inner = 1) and w [n], and writes y [outer * inner, n] contiguous:
//   y = T(float(w) * float(T(xf * rsqrt(mean(xf^2) + eps)))),  xf = float(x), T = the dtype.
// AddRmsNorm updates x [rows, n] contiguous in place with delta [rows, n] contiguous, as ATen's
// x + delta rounds it (x = T(float(x) + float(delta)); for fp32 a plain add), then writes
// y [rows, n] contiguous = RmsNorm of the new x, bit for bit what RmsNorm writes for it. Any n:
// rows are read in 16-byte packs exactly when RmsNorm would read them so (n a multiple of
// 16 / sizeof(T), x, w, y 16-byte aligned), else element by element; delta must then be
// 16-byte aligned too (else cudaErrorInvalidValue). x, delta, w and y must not overlap.
// RopeInPlace rotates x [tokens, heads, head_dim] (element strides stride_t, stride_h, 1) in
// place with cos, sin [tokens, head_dim] contiguous, as ATen's x * cos + rotate_half(x) * sin
// rounds it: each product rounded to T, then their float sum rounded to T.
// SiluMul reads gu [rows, 2 * inter] contiguous, gate g = gu[:, :inter] and up u = gu[:, inter:],
// and writes out [rows, inter] contiguous as ATen's at::silu(g) * u rounds it:
//   out = T(float(T(gf / (1 + expf(-gf)))) * float(u)),  gf = float(g).
//
// Pointers are device memory of one dtype; `stream` is a cudaStream_t. Nothing is allocated and
// nothing waits on the host, so all can be captured in a CUDA graph. They return 0 or the CUDA
// error code of the launch (cudaErrorInvalidValue for sizes the kernels do not take).
#pragma once

#include <cstdint>
#include <string>

namespace defkv::kernels {

#ifdef DEFKV_WITH_CUDA

enum class DType { kFloat32, kFloat16, kBFloat16 };

int RmsNorm(DType dtype, const void* x, int64_t outer, int64_t inner, int64_t n, int64_t stride_outer,
            int64_t stride_inner, const void* w, float eps, void* y, void* stream);

int AddRmsNorm(DType dtype, void* x, const void* delta, int64_t rows, int64_t n, const void* w, float eps, void* y,
               void* stream);

// head_dim must be even.
int RopeInPlace(DType dtype, void* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride_t,
                int64_t stride_h, const void* cos, const void* sin, void* stream);

// RopeAppend: a decode step's RoPE and KV append in one launch (RopeInPlace, then AppendRows of
// the rotated k). x [tokens, q_heads + 2 kv_heads, head_dim] is the qkv projection: each token's
// row (token stride stride_t, heads adjacent) holds its q heads, then its k heads, then its v
// heads. The q heads are rotated in place with cos, sin [tokens, head_dim] as RopeInPlace does;
// token t's k head h, rotated the same way, goes to k_pool[rows[t * kv_heads + h]] and its v head
// to v_pool[rows[...]] (pools [rows, head_dim] contiguous); x's k and v heads are left as they
// were. 16-byte packs only: head_dim / 2 and stride_t multiples of 16 / sizeof(T), and x, cos,
// sin and the pools 16-byte aligned (else cudaErrorInvalidValue).
int RopeAppend(DType dtype, void* x, int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
               int64_t stride_t, const void* cos, const void* sin, const int64_t* rows, void* k_pool, void* v_pool,
               void* stream);
int SiluMul(DType dtype, const void* gu, int64_t rows, int64_t inter, void* out, void* stream);

// cudaGetErrorString of a code returned above.
std::string CudaErrorString(int code);

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::kernels
