// The CUDA half of norm_rope.h. Layouts and rounding are written there; the CPU reference is
// the ATen code in core/model (Transformer::RmsNorm, Rope::Apply, the residual adds and the
// SiLU gate of Transformer::Run) that these kernels replace on CUDA. Products and sums use
// __fmul_rn/__fadd_rn: nvcc would otherwise contract a * b + c into one fma, which rounds once
// where ATen (one kernel per op) rounds twice.
//
// RmsNorm: one block per row, 32 to 1024 threads, 16-byte loads when the row, w and y allow
// them. The sum of squares is a float block reduction (so it may differ from ATen's reduction
// order in the last bit); mean = sum * (1 / n) and rsqrtf as ATen's CUDA mean and rsqrt do.
// AddRmsNorm: RmsNorm's kernel with the add in its first pass. The pack width and the threads
// per row are chosen by RmsNorm's rule and the per-row steps are shared device functions, so y
// is what RmsNorm would write for the new x, bit for bit.
// RopeInPlace: one thread per V pairs (i, i + D/2) of one (token, head): both halves are read
// before either is written, so the rotation is in place with no scratch.
// SiluMul: one thread per V outputs, 16-byte loads when inter, gu and out allow them (the
// result is the same either way: each element is computed alone).
// Every kernel here may be launched with programmatic dependent launch (kernels/launch.cuh): what
// the kernel before it wrote (RmsNorm's x, AddRmsNorm's delta, SiluMul's gu) is read after the
// wait by LoadCoherent; RoPE's x and AddRmsNorm's x are written by the kernel itself, so they
// never take the read-only path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

// Only CUDA builds compile this file, and they define this; a standalone nvcc check may not.
#ifndef DEFKV_WITH_CUDA
#define DEFKV_WITH_CUDA 1
#endif
#include "kernels/launch.cuh"
#include "kernels/norm_rope.h"
#include "kernels/num.cuh"

namespace defkv::kernels {
namespace {


// V elements moved as one load or store (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The sum of v over the block (blockDim.x a multiple of 32); every thread gets it.
__device__ float BlockSum(float v) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warps = blockDim.x / 32;
  if (warps == 1) return v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < warps ? warp_sums[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The steps of one RMSNorm row that RmsNormKernel and AddRmsNormKernel share, so that their
// results agree bit for bit: squares summed per thread in element order, then BlockSum.
template <typename T, int V>
__device__ float AddSquares(float sum, Pack<T, V> p) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float f = Num<T>::ToFloat(p.v[j]);
    sum = __fadd_rn(sum, __fmul_rn(f, f));
  }
  return sum;
}

// 1 / rms of the row from its block-wide sum of squares.
__device__ float InvRms(float sum, float inv_n, float eps) { return rsqrtf(__fadd_rn(__fmul_rn(sum, inv_n), eps)); }

// y = T(w * T(x * inv_rms)) for one pack of x and the matching pack of w.
template <typename T, int V>
__device__ Pack<T, V> Normalize(Pack<T, V> x, Pack<T, V> w, float inv_rms) {
  Pack<T, V> out;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float normed = Round<T>(__fmul_rn(Num<T>::ToFloat(x.v[j]), inv_rms));
    out.v[j] = Num<T>::FromFloat(__fmul_rn(Num<T>::ToFloat(w.v[j]), normed));
  }
  return out;
}

// x row r of [outer, inner, n] -> y [outer * inner, n]; one block per row.
template <typename T, int V>
__global__ void RmsNormKernel(const T* __restrict__ x, int64_t inner, int64_t n, int64_t stride_outer,
                              int64_t stride_inner, const T* __restrict__ w, float eps, float inv_n,
                              T* __restrict__ y) {
  using P = Pack<T, V>;
  WaitForPrecedingGrid();  // kernels/launch.cuh
  LetDependentsLaunch();
  const int64_t row = blockIdx.x;
  const P* xr = reinterpret_cast<const P*>(x + (row / inner) * stride_outer + (row % inner) * stride_inner);
  const P* wp = reinterpret_cast<const P*>(w);
  P* yr = reinterpret_cast<P*>(y + row * n);
  const int64_t packs = n / V;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) sum = AddSquares(sum, LoadCoherent(xr + i));
  const float r = InvRms(BlockSum(sum), inv_n, eps);
  // Second pass over the row: it was just read, so this hits L2.
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) yr[i] = Normalize(LoadCoherent(xr + i), wp[i], r);
}

// Row r of x [rows, n] += the same row of delta, then y row r = RmsNorm of it; one block per
// row, the same threads per pack as RmsNormKernel. Each thread reads back in the second pass
// only the packs it wrote in the first, so no barrier is needed between them.
template <typename T, int V>
__global__ void AddRmsNormKernel(T* __restrict__ x, const T* __restrict__ delta, int64_t n, const T* __restrict__ w,
                                 float eps, float inv_n, T* __restrict__ y) {
  using P = Pack<T, V>;
  WaitForPrecedingGrid();  // kernels/launch.cuh
  LetDependentsLaunch();
  const int64_t row = blockIdx.x;
  P* xr = reinterpret_cast<P*>(x + row * n);
  const P* dr = reinterpret_cast<const P*>(delta + row * n);
  const P* wp = reinterpret_cast<const P*>(w);
  P* yr = reinterpret_cast<P*>(y + row * n);
  const int64_t packs = n / V;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P a = xr[i], b = LoadCoherent(dr + i);
    P s;
#pragma unroll
    for (int j = 0; j < V; ++j) s.v[j] = Num<T>::FromFloat(__fadd_rn(Num<T>::ToFloat(a.v[j]), Num<T>::ToFloat(b.v[j])));
    xr[i] = s;
    sum = AddSquares(sum, s);
  }
  const float r = InvRms(BlockSum(sum), inv_n, eps);
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) yr[i] = Normalize(xr[i], wp[i], r);
}

// The rotation of V pairs (x1[k], x2[k]) = (x[j + k], x[half + j + k]) with the matching packs
// of cos and sin: o1 = T(T(x1 c1) + T(-x2 s1)), o2 = T(T(x2 c2) + T(x1 s2)).
template <typename T, int V>
__device__ void Rotate(const Pack<T, V>& x1, const Pack<T, V>& x2, const Pack<T, V>& c1, const Pack<T, V>& c2,
                       const Pack<T, V>& s1, const Pack<T, V>& s2, Pack<T, V>& o1, Pack<T, V>& o2) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float a = Num<T>::ToFloat(x1.v[k]), b = Num<T>::ToFloat(x2.v[k]);
    // rotate_half(x) = cat(-x2, x1): the first half pairs with -x2, the second with x1.
    const float lo = __fadd_rn(Round<T>(__fmul_rn(a, Num<T>::ToFloat(c1.v[k]))),
                               Round<T>(__fmul_rn(-b, Num<T>::ToFloat(s1.v[k]))));
    const float hi = __fadd_rn(Round<T>(__fmul_rn(b, Num<T>::ToFloat(c2.v[k]))),
                               Round<T>(__fmul_rn(a, Num<T>::ToFloat(s2.v[k]))));
    o1.v[k] = Num<T>::FromFloat(lo);
    o2.v[k] = Num<T>::FromFloat(hi);
  }
}

// One thread per V pairs (j .. j + V, half + j .. half + j + V) of one (token, head).
template <typename T, int V>
__global__ void RopeKernel(T* __restrict__ x, int64_t heads, int64_t half, int64_t stride_t, int64_t stride_h,
                           const T* __restrict__ cos, const T* __restrict__ sin, int64_t total) {
  using P = Pack<T, V>;
  WaitForPrecedingGrid();  // kernels/launch.cuh
  LetDependentsLaunch();
  const int64_t packs = half / V;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = (i % packs) * V, head_row = i / packs;
    const int64_t h = head_row % heads, t = head_row / heads;
    T* row = x + t * stride_t + h * stride_h;
    const T* c = cos + t * 2 * half;
    const T* s = sin + t * 2 * half;
    const P x1 = *reinterpret_cast<const P*>(row + j), x2 = *reinterpret_cast<const P*>(row + half + j);
    const P c1 = *reinterpret_cast<const P*>(c + j), c2 = *reinterpret_cast<const P*>(c + half + j);
    const P s1 = *reinterpret_cast<const P*>(s + j), s2 = *reinterpret_cast<const P*>(s + half + j);
    P o1, o2;
    Rotate(x1, x2, c1, c2, s1, s2, o1, o2);
    *reinterpret_cast<P*>(row + j) = o1;
    *reinterpret_cast<P*>(row + half + j) = o2;
  }
}

// RopeAppend: one thread per V pairs of one (token, head) of the qkv row, heads numbered q
// (0 .. hq), k (hq .. hq + hkv), v (the rest). A q head is rotated in place, a k head rotated
// into its pool row, a v head's two packs copied into its pool row. x was written by the kernel
// just before (the projection): coherent loads (kernels/launch.cuh). cos, sin and rows were
// written before the step's first kernel.
template <typename T, int V>
__global__ void RopeAppendKernel(T* x, int64_t hq, int64_t hkv, int64_t half, int64_t stride_t,
                                 const T* __restrict__ cos, const T* __restrict__ sin, const int64_t* __restrict__ rows,
                                 T* k_pool, T* v_pool, int64_t total) {
  using P = Pack<T, V>;
  WaitForPrecedingGrid();
  LetDependentsLaunch();
  const int64_t packs = half / V, heads = hq + 2 * hkv, d = 2 * half;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = (i % packs) * V, head_row = i / packs;
    const int64_t h = head_row % heads, t = head_row / heads;
    T* row = x + t * stride_t + h * d;
    const P x1 = LoadCoherent(reinterpret_cast<const P*>(row + j));
    const P x2 = LoadCoherent(reinterpret_cast<const P*>(row + half + j));
    if (h >= hq + hkv) {
      T* to = v_pool + rows[t * hkv + (h - hq - hkv)] * d;
      *reinterpret_cast<P*>(to + j) = x1;
      *reinterpret_cast<P*>(to + half + j) = x2;
      continue;
    }
    const T* c = cos + t * d;
    const T* s = sin + t * d;
    const P c1 = *reinterpret_cast<const P*>(c + j), c2 = *reinterpret_cast<const P*>(c + half + j);
    const P s1 = *reinterpret_cast<const P*>(s + j), s2 = *reinterpret_cast<const P*>(s + half + j);
    P o1, o2;
    Rotate(x1, x2, c1, c2, s1, s2, o1, o2);
    T* to = h < hq ? row : k_pool + rows[t * hkv + (h - hq)] * d;
    *reinterpret_cast<P*>(to + j) = o1;
    *reinterpret_cast<P*>(to + half + j) = o2;
  }
}

// One thread per V elements of out [rows, inter]: its row's gate g and up u are the two halves
// of the gu row. ATen's at::silu is x / (1 + expf(-x)) in float (expf and an IEEE division,
// as nvcc compiles them without fast math), rounded to T; the product with u is then rounded.
template <typename T, int V>
__global__ void SiluMulKernel(const T* __restrict__ gu, int64_t inter, T* __restrict__ out, int64_t total) {
  using P = Pack<T, V>;
  WaitForPrecedingGrid();  // kernels/launch.cuh
  LetDependentsLaunch();
  const int64_t packs = inter / V;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const T* g = gu + (i / packs) * 2 * inter + (i % packs) * V;
    const P gp = LoadCoherent(reinterpret_cast<const P*>(g)), up = LoadCoherent(reinterpret_cast<const P*>(g + inter));
    P o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o.v[k] = SiluGate<T>(Num<T>::ToFloat(gp.v[k]), Num<T>::ToFloat(up.v[k]));
    }
    *reinterpret_cast<P*>(out + i * V) = o;
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether RmsNorm takes its rows in 16-byte packs, and its threads per row: together they fix
// the reduction order, so AddRmsNorm decides both the same way.
template <typename T>
bool RmsNormVec(int64_t n, int64_t inner, int64_t stride_outer, int64_t stride_inner, const void* x, const void* w,
                const void* y) {
  constexpr int kVec = 16 / sizeof(T);
  return n % kVec == 0 && stride_outer % kVec == 0 && (inner == 1 || stride_inner % kVec == 0) && Aligned16(x) &&
         Aligned16(w) && Aligned16(y);
}
int RmsNormThreads(int64_t packs) {
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (packs + 31) / 32 * 32)));
}

template <typename T>
int LaunchRmsNorm(const void* x, int64_t outer, int64_t inner, int64_t n, int64_t stride_outer, int64_t stride_inner,
                  const void* w, float eps, void* y, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = RmsNormVec<T>(n, inner, stride_outer, stride_inner, x, w, y);
  const int threads = RmsNormThreads(vec ? n / kVec : n);
  const dim3 grid(static_cast<unsigned>(outer * inner));
  const float inv_n = 1.f / static_cast<float>(n);
  const auto* xt = static_cast<const T*>(x);
  const auto* wt = static_cast<const T*>(w);
  auto* yt = static_cast<T*>(y);
  if (vec)
    Launch(kPdlRmsNorm, RmsNormKernel<T, kVec>, grid, threads, 0, stream, xt, inner, n, stride_outer, stride_inner, wt, eps, inv_n, yt);
  else
    Launch(kPdlRmsNorm, RmsNormKernel<T, 1>, grid, threads, 0, stream, xt, inner, n, stride_outer, stride_inner, wt, eps, inv_n, yt);
  return static_cast<int>(cudaGetLastError());
}

// x, y as RmsNorm's [rows, 1, n] with stride_outer = n; delta is read in the packs x is read in.
template <typename T>
int LaunchAddRmsNorm(void* x, const void* delta, int64_t rows, int64_t n, const void* w, float eps, void* y,
                     cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = RmsNormVec<T>(n, 1, n, 0, x, w, y);
  if (vec && !Aligned16(delta)) return static_cast<int>(cudaErrorInvalidValue);
  const int threads = RmsNormThreads(vec ? n / kVec : n);
  const dim3 grid(static_cast<unsigned>(rows));
  const float inv_n = 1.f / static_cast<float>(n);
  auto* xt = static_cast<T*>(x);
  const auto* dt = static_cast<const T*>(delta);
  const auto* wt = static_cast<const T*>(w);
  auto* yt = static_cast<T*>(y);
  if (vec)
    Launch(kPdlAddRmsNorm, AddRmsNormKernel<T, kVec>, grid, threads, 0, stream, xt, dt, n, wt, eps, inv_n, yt);
  else
    Launch(kPdlAddRmsNorm, AddRmsNormKernel<T, 1>, grid, threads, 0, stream, xt, dt, n, wt, eps, inv_n, yt);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int LaunchRope(void* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride_t, int64_t stride_h,
               const void* cos, const void* sin, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t half = head_dim / 2;
  const bool vec = half % kVec == 0 && stride_t % kVec == 0 && stride_h % kVec == 0 && Aligned16(x) &&
                   Aligned16(cos) && Aligned16(sin);
  const int64_t total = tokens * heads * (vec ? half / kVec : half);
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16)));
  auto* xt = static_cast<T*>(x);
  const auto* ct = static_cast<const T*>(cos);
  const auto* st = static_cast<const T*>(sin);
  if (vec)
    Launch(kPdlRope, RopeKernel<T, kVec>, grid, kThreads, 0, stream, xt, heads, half, stride_t, stride_h, ct, st, total);
  else
    Launch(kPdlRope, RopeKernel<T, 1>, grid, kThreads, 0, stream, xt, heads, half, stride_t, stride_h, ct, st, total);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int LaunchRopeAppend(void* x, int64_t tokens, int64_t hq, int64_t hkv, int64_t head_dim, int64_t stride_t,
                     const void* cos, const void* sin, const int64_t* rows, void* k_pool, void* v_pool,
                     cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t half = head_dim / 2;
  if (half % kVec != 0 || stride_t % kVec != 0 || !Aligned16(x) || !Aligned16(cos) || !Aligned16(sin) ||
      !Aligned16(k_pool) || !Aligned16(v_pool))
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t total = tokens * (hq + 2 * hkv) * (half / kVec);
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16)));
  Launch(kPdlRope | kPdlAppend, RopeAppendKernel<T, kVec>, grid, kThreads, 0, stream, static_cast<T*>(x), hq, hkv,
         half, stride_t, static_cast<const T*>(cos), static_cast<const T*>(sin), rows, static_cast<T*>(k_pool),
         static_cast<T*>(v_pool), total);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int LaunchSiluMul(const void* gu, int64_t rows, int64_t inter, void* out, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = inter % kVec == 0 && Aligned16(gu) && Aligned16(out);
  const int64_t total = rows * (vec ? inter / kVec : inter);
  // 128 threads: a batch-1 decode step has ~2K packs (inter 14336 to 18944 in bf16), and
  // smaller blocks spread them over more SMs.
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16)));
  const auto* gt = static_cast<const T*>(gu);
  auto* ot = static_cast<T*>(out);
  if (vec)
    Launch(kPdlSiluMul, SiluMulKernel<T, kVec>, grid, kThreads, 0, stream, gt, inter, ot, total);
  else
    Launch(kPdlSiluMul, SiluMulKernel<T, 1>, grid, kThreads, 0, stream, gt, inter, ot, total);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int RmsNorm(DType dtype, const void* x, int64_t outer, int64_t inner, int64_t n, int64_t stride_outer,
            int64_t stride_inner, const void* w, float eps, void* y, void* stream) {
  if (outer < 0 || inner < 1 || n < 0 || outer * inner > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  if (outer == 0 || n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return LaunchRmsNorm<float>(x, outer, inner, n, stride_outer, stride_inner, w, eps, y, s);
    case DType::kFloat16: return LaunchRmsNorm<__half>(x, outer, inner, n, stride_outer, stride_inner, w, eps, y, s);
    case DType::kBFloat16:
      return LaunchRmsNorm<__nv_bfloat16>(x, outer, inner, n, stride_outer, stride_inner, w, eps, y, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int AddRmsNorm(DType dtype, void* x, const void* delta, int64_t rows, int64_t n, const void* w, float eps, void* y,
               void* stream) {
  if (rows < 0 || n < 0 || rows > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return LaunchAddRmsNorm<float>(x, delta, rows, n, w, eps, y, s);
    case DType::kFloat16: return LaunchAddRmsNorm<__half>(x, delta, rows, n, w, eps, y, s);
    case DType::kBFloat16: return LaunchAddRmsNorm<__nv_bfloat16>(x, delta, rows, n, w, eps, y, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int RopeInPlace(DType dtype, void* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride_t,
                int64_t stride_h, const void* cos, const void* sin, void* stream) {
  if (tokens < 0 || heads < 0 || head_dim < 0 || head_dim % 2 != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (tokens == 0 || heads == 0 || head_dim == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return LaunchRope<float>(x, tokens, heads, head_dim, stride_t, stride_h, cos, sin, s);
    case DType::kFloat16: return LaunchRope<__half>(x, tokens, heads, head_dim, stride_t, stride_h, cos, sin, s);
    case DType::kBFloat16:
      return LaunchRope<__nv_bfloat16>(x, tokens, heads, head_dim, stride_t, stride_h, cos, sin, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int RopeAppend(DType dtype, void* x, int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
               int64_t stride_t, const void* cos, const void* sin, const int64_t* rows, void* k_pool, void* v_pool,
               void* stream) {
  if (tokens < 0 || q_heads < 0 || kv_heads < 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      (tokens > 1 && stride_t < (q_heads + 2 * kv_heads) * head_dim))
    return static_cast<int>(cudaErrorInvalidValue);
  if (tokens == 0 || q_heads + kv_heads == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return LaunchRopeAppend<float>(x, tokens, q_heads, kv_heads, head_dim, stride_t, cos, sin, rows, k_pool, v_pool, s);
    case DType::kFloat16:
      return LaunchRopeAppend<__half>(x, tokens, q_heads, kv_heads, head_dim, stride_t, cos, sin, rows, k_pool, v_pool, s);
    case DType::kBFloat16:
      return LaunchRopeAppend<__nv_bfloat16>(x, tokens, q_heads, kv_heads, head_dim, stride_t, cos, sin, rows, k_pool,
                                             v_pool, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int SiluMul(DType dtype, const void* gu, int64_t rows, int64_t inter, void* out, void* stream) {
  if (rows < 0 || inter < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || inter == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return LaunchSiluMul<float>(gu, rows, inter, out, s);
    case DType::kFloat16: return LaunchSiluMul<__half>(gu, rows, inter, out, s);
    case DType::kBFloat16: return LaunchSiluMul<__nv_bfloat16>(gu, rows, inter, out, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

std::string CudaErrorString(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace defkv::kernels
