// The weight GEMV of a decode step: a linear layer over 1 to 8 rows, which is what at::linear
// (cuBLAS) computes for the qkv, o, gate/up and down projections and the lm_head of
// Transformer::RunLayer and Head (wrapped for at::Tensor as FusedLinear in
// core/model/fused_ops.h; at::linear stays the reference). Its whole cost is reading W once, so
// the kernel is built to stream W at HBM bandwidth.
//
//   y[m, n] = T(sum_k float(x[m, k]) * float(w[n, k]) + float(bias[n])),  m < M, n < N
// x: [M, K] contiguous, 1 <= M <= kGemvMaxRows; w: [N, K] contiguous (an nn.Linear weight);
// bias: [N] or null; y: [M, N] contiguous; all of one dtype T (fp16 or bf16). The sum is fp32
// (tensor-core products, exact in fp32, and fp32 accumulation); y is rounded once. K must be a
// multiple of 8 and x, w 16-byte aligned (every row is read in 16-byte pieces); bias and y need
// only element alignment. y must not overlap x, w or bias. The summation order is fixed by the
// shape alone, so equal inputs give equal bits.
//
// Pointers are device memory; `stream` is a cudaStream_t. Nothing is allocated and nothing waits
// on the host (CUDA graphs capture it). Returns 0 or the CUDA error code of the launch;
// cudaErrorInvalidValue for what the kernel does not take (see GemvSupported, the alignment
// above). Callers check first and fall back to ATen.
#pragma once

#include <cstdint>

#include "kernels/norm_rope.h"  // DType, CudaErrorString

namespace defkv::kernels {

#ifdef DEFKV_WITH_CUDA

inline constexpr int64_t kGemvMaxRows = 8;

// fp16 and bf16, 1 <= m <= kGemvMaxRows, k >= 0 a multiple of 8.
bool GemvSupported(DType dtype, int64_t m, int64_t k);

int Gemv(DType dtype, const void* x, int64_t m, int64_t k, const void* w, int64_t n, const void* bias, void* y,
         void* stream);

// The MLP's gate/up projection and its SiLU gate in one kernel: w is [2 * inter, K] (the gate
// rows, then the up rows, as Transformer's fused w_gate_up), bias [2 * inter] or null, and
//   y[m, j] = T(T(silu(g)) * u),  g = T(gate row j's sum), u = T(up row j's sum), j < inter,
// with silu(g) = g / (1 + expf(-g)): the same bits as Gemv into [M, 2 * inter] followed by the
// SiLU gate kernel (norm_rope.h's SiluMul), without writing or reading the [M, 2 * inter] product.
// Each block reads 8 gate rows and the matching 8 up rows. Same conditions and codes as Gemv.
int GemvSiluGate(DType dtype, const void* x, int64_t m, int64_t k, const void* w, int64_t inter, const void* bias,
                 void* y, void* stream);

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::kernels
