// The CUDA half of gemv.h (layouts and rounding are written there). The reference is
// at::linear; its CPU run in fp32 is the test's.
//
// The product is y^T = W x^T on the tensor cores: mma.sync.m16n8k16.row.col with W as the
// 16 x 16 A operand (16 rows of W, K-contiguous: "row") and x as the 16 x 8 B operand (column n
// of B is x row n, K-contiguous: "col"; the 8 columns cover M <= 8, columns past M are zeros).
// An mma multiplies each W element by all M rows of x at once, so no lane converts or
// multiplies in fp32, and x is read once per 16 rows of W, not once per row.
//
// - Loads straight into fragments. The dot product does not care which k each fragment slot
//   stands for, as long as W and x agree, so lane (g = lane / 4, q = lane % 4) loads whole
//   16-byte pieces: W rows g and g + 8 and x row g (g < M), all at the same 8 k's, the piece
//   4 s + q of step s. The first 4 elements of a piece are its slots of one mma (fragment
//   k 2q, 2q + 1 and 2q + 8, 2q + 9), the last 4 of a second: one step is 32 k, 2 mma.
// - Block: 8 warps (256 threads) on 16 rows of W. Warp w takes steps w, w + 8, w + 16, ... of
//   all K (at a given moment the 8 warps read one contiguous 512-byte span of each of the 16
//   rows), 8 steps in flight per lane: 16 W loads of 16 bytes (256 bytes per lane, 64 KB per
//   block; 120 registers with nvcc 13.0, so 2 blocks per SM) and 8 of x, issued together before
//   any mma. W loads are ld.global.nc with L1::no_allocate (W is read once; x stays in L1) and
//   L2::256B (the neighbouring warps' pieces). x is read by coherent loads (see Load16), not
//   staged in shared memory: each x element is loaded by one lane of a block and shared by the
//   mma across the 16 rows, so staging would add a barrier and a size limit on K * M for no reuse.
//   Under programmatic dependent launch the first round of W loads is issued before the wait for
//   the kernel that writes x.
// - Grid: ceil(N / 16) blocks (256 for N = 4096, 8016 for the 128256-row lm_head). Rows past N
//   and pieces past K load zeros (predicated loads, no branch). At the end every warp's 16 x M
//   fp32 sums go to shared memory and are added in warp order (the order depends on the shape
//   only), plus the bias, and rounded once.
//
// Expected speed, not yet measured (defkv-bench --gemv-sweep prints it): W at close to the HBM
// read bandwidth for the 7-8B projections, at M = 1 and M = 4 alike (the mma work is ~1% of the
// tensor rate). The smallest matrix (o, 32 MB: 256 blocks, about 2 per SM, each warp 2 load rounds
// deep) takes ~7 us at that rate, so its launch and ramp-up are a visible part of it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// Only CUDA builds compile this file, and they define this; a standalone nvcc check may not.
#ifndef DEFKV_WITH_CUDA
#define DEFKV_WITH_CUDA 1
#endif
#include "kernels/gemv.h"
#include "kernels/launch.cuh"
#include "kernels/num.cuh"

namespace defkv::kernels {
namespace {

constexpr int kWarps = 8;  // warps per block, each on a slice of K for all of the block's rows
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;   // W rows per block: the M of one mma tile
constexpr int kUnroll = 8;  // steps in flight per warp (2 W pieces and 1 x piece per lane each)

// 16 bytes at p when `pred`, else zeros. W (kStreamed) is read once, so it is not kept in L1
// and asks L2 for the neighbouring warps' pieces. x is written by the kernel just before this one,
// which under programmatic dependent launch (kernels/launch.cuh) may still be running when this
// kernel starts: x must not go through the non-coherent read-only path (ld.global.nc promises
// data that is constant for the kernel's whole life, so ptxas may move such a load above
// WaitForPrecedingGrid), so it is a coherent load, after the wait. Both are volatile so that
// they stay on their side of the wait in the PTX: the first W loads before it, every x load after.
template <bool kStreamed>
__device__ __forceinline__ uint4 Load16(const void* p, bool pred) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if constexpr (kStreamed)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %5, 0; @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4]; }"
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
        : "l"(p), "r"(static_cast<int>(pred)));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %5, 0; @p ld.global.v4.u32 {%0, %1, %2, %3}, [%4]; }"
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
        : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}

// c += a b for one m16n8k16 tile, fp32 accumulators. a: {row g, k 2q..}, {row g + 8, k 2q..},
// {row g, k 2q + 8..}, {row g + 8, k 2q + 8..}; b: {k 2q.., column g}, {k 2q + 8.., column g}.
template <typename T>
__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Block b: y[:, 16 b .. 16 b + 15] of x [m, k], w [n, k], bias [n] (or null), y [m, n].
// kSiluGate: w is [2 n, k], gate rows then up rows, and block b takes gate rows 8 b .. 8 b + 7 as
// its tile rows 0-7 and the matching up rows n + 8 b .. as rows 8-15; y [m, n] = the SiLU gate of
// the two, as SiluMulKernel (kernels/norm_rope.cu) computes it from the rounded gate and up.
template <typename T, bool kSiluGate>
__global__ void __launch_bounds__(kThreads, 2)
    GemvKernel(const T* __restrict__ x, int m, int64_t k, const T* __restrict__ w, int64_t n,
               const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float part[kWarps][kGemvMaxRows][kRows];  // per warp, its sums [x row][W row]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, q = lane % 4;
  // The W rows of tile rows g (lo) and g + 8 (hi).
  const int64_t row0 = int64_t{blockIdx.x} * (kSiluGate ? kRows / 2 : kRows);
  const int64_t lo_row = row0 + g, hi_row = kSiluGate ? n + row0 + g : row0 + g + 8;
  const bool lo_in = row0 + g < n, hi_in = kSiluGate ? lo_in : row0 + g + 8 < n, x_in = g < m;
  // Byte addresses of the lane's two W rows and its x row (row 0 for lanes that load nothing).
  const char* w_lo = reinterpret_cast<const char*>(w) + (lo_in ? lo_row : 0) * k * sizeof(T);
  const char* w_hi = reinterpret_cast<const char*>(w) + (hi_in ? hi_row : 0) * k * sizeof(T);
  const char* x_row = reinterpret_cast<const char*>(x) + (x_in ? g : 0) * k * sizeof(T);
  const int64_t pieces = k / 8, steps = (pieces + 3) / 4;  // 16-byte pieces of a row; 4 per step

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  bool waited = false;
  for (int64_t s0 = warp; s0 < steps; s0 += kWarps * kUnroll) {
    uint4 lo[kUnroll], hi[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t at = ((s0 + int64_t{u} * kWarps) * 4 + q) * 16;
      const bool in = at < pieces * 16;
      lo[u] = Load16<true>(w_lo + at, in && lo_in);
      hi[u] = Load16<true>(w_hi + at, in && hi_in);
    }
    // Under programmatic dependent launch (kernels/launch.cuh) the first round of W loads is in
    // flight while the kernel that writes x finishes.
    if (!waited) {
      WaitForPrecedingGrid();
      LetDependentsLaunch();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t at = ((s0 + int64_t{u} * kWarps) * 4 + q) * 16;
      b[u] = Load16<false>(x_row + at, at < pieces * 16 && x_in);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      Mma<T>(acc, lo[u].x, hi[u].x, lo[u].y, hi[u].y, b[u].x, b[u].y);  // elements 0-3 of the pieces
      Mma<T>(acc, lo[u].z, hi[u].z, lo[u].w, hi[u].w, b[u].z, b[u].w);  // elements 4-7
    }
  }

  if (!waited) {  // a warp with no step of K (K < 32 * warp): it still writes shared memory and y
    WaitForPrecedingGrid();
    LetDependentsLaunch();
  }
  // acc[j]: W row g, x row 2q + j; acc[2 + j]: W row g + 8, x row 2q + j.
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int c = 2 * q + j;
    if (c < m) {
      part[warp][c][g] = acc[j];
      part[warp][c][g + 8] = acc[2 + j];
    }
  }
  __syncthreads();
  const int t = threadIdx.x;
  if constexpr (kSiluGate) {
    // m * 8 outputs, one thread each: gate and up are summed and rounded as y would be, then
    // gated as SiluMulKernel gates them (num.cuh's SiluGate).
    constexpr int kOut = kRows / 2;
    if (t < m * kOut) {
      const int c = t / kOut, r = t % kOut;
      const int64_t j = row0 + r;
      if (j < n) {
        float gs = part[0][c][r], us = part[0][c][r + kOut];
#pragma unroll
        for (int v = 1; v < kWarps; ++v) {
          gs += part[v][c][r];
          us += part[v][c][r + kOut];
        }
        if (bias != nullptr) {
          gs += Num<T>::ToFloat(bias[j]);
          us += Num<T>::ToFloat(bias[n + j]);
        }
        y[c * n + j] = SiluGate<T>(Round<T>(gs), Round<T>(us));
      }
    }
    return;
  }
  // m * kRows <= 128 outputs, one thread each; consecutive threads write consecutive n.
  if (t < m * kRows) {
    const int c = t / kRows, r = t % kRows;
    const int64_t row = row0 + r;
    if (row < n) {
      float s = part[0][c][r];
#pragma unroll
      for (int v = 1; v < kWarps; ++v) s += part[v][c][r];
      if (bias != nullptr) s += Num<T>::ToFloat(bias[row]);
      y[c * n + row] = Num<T>::FromFloat(s);
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kSiluGate>
int LaunchGemv(const void* x, int64_t m, int64_t k, const void* w, int64_t n, const void* bias, void* y,
               cudaStream_t stream) {
  const int64_t rows = kSiluGate ? kRows / 2 : kRows;
  const dim3 grid(static_cast<unsigned>((n + rows - 1) / rows));
  Launch(kPdlGemv, GemvKernel<T, kSiluGate>, grid, kThreads, 0, stream, static_cast<const T*>(x), static_cast<int>(m), k,
         static_cast<const T*>(w), n, static_cast<const T*>(bias), static_cast<T*>(y));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

bool GemvSupported(DType dtype, int64_t m, int64_t k) {
  return dtype != DType::kFloat32 && m >= 1 && m <= kGemvMaxRows && k >= 0 && k % 8 == 0;
}

namespace {
template <bool kSiluGate>
int Dispatch(DType dtype, const void* x, int64_t m, int64_t k, const void* w, int64_t n, const void* bias, void* y,
             void* stream) {
  const int64_t rows = kSiluGate ? kRows / 2 : kRows;
  if (!GemvSupported(dtype, m, k) || n < 0 || (n + rows - 1) / rows > INT32_MAX || !Aligned16(x) || !Aligned16(w))
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16: return LaunchGemv<__half, kSiluGate>(x, m, k, w, n, bias, y, s);
    case DType::kBFloat16: return LaunchGemv<__nv_bfloat16, kSiluGate>(x, m, k, w, n, bias, y, s);
    case DType::kFloat32: break;
  }
  return static_cast<int>(cudaErrorInvalidValue);
}
}  // namespace

int Gemv(DType dtype, const void* x, int64_t m, int64_t k, const void* w, int64_t n, const void* bias, void* y,
         void* stream) {
  return Dispatch<false>(dtype, x, m, k, w, n, bias, y, stream);
}

int GemvSiluGate(DType dtype, const void* x, int64_t m, int64_t k, const void* w, int64_t inter, const void* bias,
                 void* y, void* stream) {
  return Dispatch<true>(dtype, x, m, k, w, inter, bias, y, stream);
}

}  // namespace defkv::kernels
