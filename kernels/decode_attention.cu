// The CUDA half of decode_attention.h. The reference is softmax(scale * q K^T) V per segment
// (core/cache: the varlen flash call this replaces, and the CPU per-segment attention).
//
// SplitKernel: one block of 4 warps per (segment, chunk). A key row is D * sizeof(T) bytes, read
// by L = D / V lanes with one 16-byte load each (V = 16 / sizeof(T) elements); a warp reads
// KPS = 32 / L rows per step (bf16, D = 128: two half-warps, 512 contiguous bytes) and U steps
// per iteration, issuing all 2 * U loads (K and V) of an iteration before using any of them, so
// each lane keeps 2 * U * 16 bytes in flight. Warps take interleaved runs of KPS * U rows. Each
// sub-group of L lanes keeps its own online softmax (running max m, sum l) and fp32 p * V
// accumulator for the G query rows (q scaled and held in registers as float); the G dot products
// are reduced across the L lanes with __shfl_xor_sync. At the end the sub-groups of a warp merge
// by shuffles, the warps through shared memory, and the block writes its normalized partial
// output and lse = m + log2(l) (or, with one chunk per segment, the output itself); scores are in
// base 2 throughout (see kLog2e).
// CombineKernel: one block per segment; out = sum_p w_p o_p, w_p = 2^(lse_p - max) / sum_q
// 2^(lse_q - max). (Merging in the last split block of each segment to finish, with a counter
// per segment, was measured slower on the H200: docs/PERFORMANCE.md, 2026-11-29.)
// An empty range has l = 0: it writes zeros and lse = -inf, and weighs nothing in the merge.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// Only CUDA builds compile this file, and they define this; a standalone nvcc check may not.
#ifndef DEFKV_WITH_CUDA
#define DEFKV_WITH_CUDA 1
#endif
#include "kernels/decode_attention.h"
#include "kernels/launch.cuh"

namespace defkv::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// log2(e): scores are kept in base 2 (q is scaled by scale * log2(e)), so every exponential is
// one ex2.approx (relative error ~2^-22) instead of expf's longer sequence.
constexpr float kLog2e = 1.4426950408889634f;

struct SplitPlan {
  int64_t splits;
  int64_t chunk;
};

// Depends on (max_len, segments, num_sms, tuning) only: see the header. Many blocks of at least
// min_chunk keys: with several waves of them, the last wave's idle SMs cost little, and chunks of
// uneven work (segments shorter than max_len) balance out.
SplitPlan PlanSplits(int64_t max_len, int64_t segments, int num_sms, const DecodeAttentionTuning& tuning) {
  max_len = std::max<int64_t>(max_len, 1);
  segments = std::max<int64_t>(segments, 1);
  const int64_t sms = std::max(num_sms, 1);
  const bool many = segments >= 256;
  const int64_t min_chunk_or_default = tuning.min_chunk > 0 ? tuning.min_chunk : many ? 128 : 256;
  const int64_t blocks_per_sm = tuning.blocks_per_sm > 0 ? tuning.blocks_per_sm : many ? 64 : 16;
  const int64_t min_chunk = std::max<int64_t>(64, (min_chunk_or_default + 63) / 64 * 64);
  const int64_t cap = (max_len + min_chunk - 1) / min_chunk;
  const int64_t blocks = blocks_per_sm * sms;
  const int64_t want = std::clamp<int64_t>((blocks + segments - 1) / segments, 1, cap);
  const int64_t per = (max_len + want - 1) / want;
  const int64_t chunk = std::max<int64_t>(min_chunk, (per + 63) / 64 * 64);
  return {(max_len + chunk - 1) / chunk, chunk};
}

__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ float FromFloatTo(float v) { return v; }
  static __device__ void ToFloats(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x), f[1] = __uint_as_float(r.y), f[2] = __uint_as_float(r.z),
    f[3] = __uint_as_float(r.w);
  }
};
template <>
struct Num<__half> {
  static __device__ __half FromFloatTo(float v) { return __float2half_rn(v); }
  static __device__ void ToFloats(const uint4& r, float* f) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 x = __half22float2(h);
      f[2 * i] = x.x, f[2 * i + 1] = x.y;
    }
  }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __nv_bfloat16 FromFloatTo(float v) { return __float2bfloat16_rn(v); }
  static __device__ void ToFloats(const uint4& r, float* f) {
    // bf16 -> float is a 16-bit shift: the low half of each word is element 2i, the high 2i + 1.
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// 16 bytes read once, no L1 allocation (K/V rows are streamed). Coherent, not ld.global.nc: the
// append kernel just before this one writes the new rows, and under programmatic dependent launch
// (kernels/launch.cuh) it may still be running when this kernel starts; a non-coherent load
// promises data constant for the kernel's life and may be moved above the wait. Volatile, so
// that it stays after WaitForPrecedingGrid in the PTX.
__device__ __forceinline__ uint4 LoadStream(const void* p) {
  uint4 r;
  asm volatile("ld.global.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Merges the online-softmax state (m2, l2, acc2) into (m, l, acc); both may be empty (m = -inf).
// Returns the factors applied to the first and second state.
__device__ __forceinline__ float2 MergeFactors(float m, float m2) {
  const float mx = fmaxf(m, m2);
  const float ms = mx == -INFINITY ? 0.f : mx;
  return make_float2(Exp2(m - ms), Exp2(m2 - ms));
}

// Block (split p of segment seg) over keys [p * chunk, min(len, (p + 1) * chunk)); the last split
// runs to len. GT >= G query rows (the rows past G are zero and never written).
// The launch's arguments (one struct: the three kernels and their dispatch share them).
struct Args {
  const void* q;
  const void* k_pool;
  const void* v_pool;
  const int32_t* seg_start;
  const int32_t* seg_len;
  int64_t n, heads, q_token_stride;
  int G;
  int splits;
  int64_t chunk;
  float scale;  // already times log2(e)
  float* part_out;
  float* part_lse;
  void* out;
};

// out[seg] = the merge of segment seg's splits (lse in base 2), its G * D elements shared by
// `threads` threads (a multiple of 32) from `tid`. The partials were written by the kernel
// before: read through L2 (__ldcg), never the read-only path. With room for
// splits * G floats in `w` (shared memory), one warp per query row first turns the lse values
// into weights 2^(lse_p - max) / sum, so the element loop is one fma per split; otherwise each
// element computes them itself.
template <typename T, int D>
__device__ void CombineSegment(const Args& a, int64_t seg, int tid, int threads, float* w, int capacity) {
  const int G = a.G, splits = a.splits;
  const float* lse_seg = a.part_lse + seg * splits * G;
  const float* out_seg = a.part_out + seg * splits * G * D;
  T* out = static_cast<T*>(a.out);
  if (splits * G <= capacity) {
    const int warp = tid / 32, lane = tid % 32;
    for (int g = warp; g < G; g += threads / 32) {
      float mx = -INFINITY;
      for (int p = lane; p < splits; p += 32) mx = fmaxf(mx, __ldcg(lse_seg + p * G + g));
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      float sum = 0.f;
      for (int p = lane; p < splits; p += 32) {
        const float f = mx == -INFINITY ? 0.f : Exp2(__ldcg(lse_seg + p * G + g) - mx);
        w[p * G + g] = f;
        sum += f;
      }
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no mass anywhere: zeros
      for (int p = lane; p < splits; p += 32) w[p * G + g] *= inv;
    }
    __syncthreads();
    for (int e = tid; e < G * D; e += threads) {
      const int g = e / D;
      float o = 0.f;
      for (int p = 0; p < splits; ++p) o = fmaf(w[p * G + g], __ldcg(out_seg + static_cast<int64_t>(p) * G * D + e), o);
      out[seg * G * D + e] = Num<T>::FromFloatTo(o);
    }
    return;
  }
  for (int e = tid; e < G * D; e += threads) {
    const int g = e / D;
    float mx = -INFINITY;
    for (int p = 0; p < splits; ++p) mx = fmaxf(mx, __ldcg(lse_seg + p * G + g));
    float wsum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
      for (int p = 0; p < splits; ++p) {
        const float f = Exp2(__ldcg(lse_seg + p * G + g) - mx);
        wsum += f;
        o = fmaf(f, __ldcg(out_seg + static_cast<int64_t>(p) * G * D + e), o);
      }
    }
    out[seg * G * D + e] = Num<T>::FromFloatTo(wsum > 0.f ? o / wsum : 0.f);
  }
}

template <typename T, int D, int GT, int U>
__global__ void __launch_bounds__(kThreads, GT >= 8 ? 2 : 4) SplitKernel(const Args a) {
  WaitForPrecedingGrid();  // kernels/launch.cuh
  LetDependentsLaunch();
  const T* __restrict__ q = static_cast<const T*>(a.q);
  const T* __restrict__ k_pool = static_cast<const T*>(a.k_pool);
  const T* __restrict__ v_pool = static_cast<const T*>(a.v_pool);
  const int G = a.G, splits = a.splits;
  const int64_t chunk = a.chunk;
  T* __restrict__ direct_out = splits == 1 ? static_cast<T*>(a.out) : nullptr;
  constexpr int V = 16 / sizeof(T);  // elements per lane per row
  constexpr int L = D / V;           // lanes per row
  constexpr int KPS = 32 / L;        // rows per warp step
  constexpr int KPW = KPS * U;       // rows per warp iteration
  static_assert(D % V == 0 && L <= 32 && 32 % L == 0, "a key row must split evenly over a power-of-2 lane group");

  const int64_t block = blockIdx.x;
  const int p = static_cast<int>(block % splits);
  const int64_t seg = block / splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, li = lane % L, sub = lane / L;

  const int64_t len = max(a.seg_len[seg], 0);
  const int64_t begin = p * chunk;
  const int64_t end = p == splits - 1 ? len : min(len, begin + chunk);
  const int64_t row0 = a.seg_start[seg];
  // Segment seg = token * heads + h reads query heads h * G .. h * G + G - 1 of its token.
  const T* qseg = q + (seg / a.heads) * a.q_token_stride + (seg % a.heads) * G * D;
  const T* kseg = k_pool + row0 * D + li * V;
  const T* vseg = v_pool + row0 * D + li * V;

  float qf[GT][V];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    if (g < G) {
      const uint4 r = *reinterpret_cast<const uint4*>(qseg + g * D + li * V);
      Num<T>::ToFloats(r, qf[g]);
#pragma unroll
      for (int i = 0; i < V; ++i) qf[g][i] *= a.scale;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) qf[g][i] = 0.f;
    }
  }

  float m[GT], l[GT], acc[GT][V];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = 0.f;
  }

  // Warp-uniform loop: every lane runs the same iterations (the shuffles need all 32).
  for (int64_t kb = begin + warp * KPW; kb < end; kb += kWarps * KPW) {
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // Past the end: re-read the last row (no branch between the loads); its score is masked.
      const int64_t key = min(kb + u * KPS + sub, end - 1);
      kr[u] = LoadStream(kseg + key * D);
      vr[u] = LoadStream(vseg + key * D);
    }
    float s[U][GT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[V];
      Num<T>::ToFloats(kr[u], kf);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) dot = fmaf(qf[g][i], kf[i], dot);
        s[u][g] = dot;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int g = 0; g < GT; ++g) {
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
      }
      if (kb + u * KPS + sub >= end) {
#pragma unroll
        for (int g = 0; g < GT; ++g) s[u][g] = -INFINITY;
      }
    }
    float ms[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      ms[g] = mx == -INFINITY ? 0.f : mx;  // all masked so far: every exp below is 0
      const float corr = Exp2(m[g] - ms[g]);
      m[g] = mx;
      l[g] *= corr;
#pragma unroll
      for (int i = 0; i < V; ++i) acc[g][i] *= corr;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[V];
      Num<T>::ToFloats(vr[u], vf);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float pe = Exp2(s[u][g] - ms[g]);
        l[g] += pe;
#pragma unroll
        for (int i = 0; i < V; ++i) acc[g][i] = fmaf(pe, vf[i], acc[g][i]);
      }
    }
  }

  // Merge the KPS sub-groups of the warp (same li, lanes li + j * L).
#pragma unroll
  for (int o = L; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float2 f = MergeFactors(m[g], m2);
      m[g] = fmaxf(m[g], m2);
      l[g] = l[g] * f.x + l2 * f.y;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float a2 = __shfl_xor_sync(0xffffffffu, acc[g][i], o);
        acc[g][i] = acc[g][i] * f.x + a2 * f.y;
      }
    }
  }

  __shared__ float sm_acc[kWarps][GT][D];
  __shared__ float sm_m[kWarps][GT], sm_l[kWarps][GT];
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
      for (int i = 0; i < V; ++i) sm_acc[warp][g][li * V + i] = acc[g][i];
      if (li == 0) sm_m[warp][g] = m[g], sm_l[warp][g] = l[g];
    }
  }
  __syncthreads();

  for (int e = threadIdx.x; e < G * D; e += kThreads) {
    const int g = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    float lsum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = Exp2(sm_m[w][g] - mx);
        lsum = fmaf(sm_l[w][g], f, lsum);
        o = fmaf(sm_acc[w][g][d], f, o);
      }
    }
    const bool empty = !(lsum > 0.f);
    const float val = empty ? 0.f : o / lsum;
    if (direct_out != nullptr) {
      direct_out[seg * G * D + e] = Num<T>::FromFloatTo(val);
    } else {
      const int64_t row = seg * splits + p;
      a.part_out[row * G * D + e] = val;
      if (d == 0) a.part_lse[row * G + g] = empty ? -INFINITY : mx + log2f(lsum);
    }
  }
}

// One block per segment: merges its splits' partial outputs (lse in base 2).
template <typename T, int D>
__global__ void CombineKernel(const Args a) {
  WaitForPrecedingGrid();
  LetDependentsLaunch();
  constexpr int kWeights = 2048;
  __shared__ float w[kWeights];
  CombineSegment<T, D>(a, blockIdx.x, threadIdx.x, blockDim.x, w, kWeights);
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int D, int GT>
int LaunchSplit(const Args& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  // Registers: q and acc take 2 * GT * V floats; keep the loads in flight (2 * U * 4) within budget.
  constexpr int U = GT * V > 32 ? 2 : 4;
  Launch(kPdlDecodeAttention, SplitKernel<T, D, GT, U>, static_cast<unsigned>(a.n * a.splits), kThreads, 0, stream, a);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  if (a.splits > 1) {
    const int threads = std::min(512, (a.G * D + 31) / 32 * 32);
    Launch(kPdlDecodeAttention, CombineKernel<T, D>, static_cast<unsigned>(a.n), threads, 0, stream, a);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int D>
int LaunchG(const Args& a, cudaStream_t s) {
  if (a.G == 1) return LaunchSplit<T, D, 1>(a, s);
  if (a.G == 2) return LaunchSplit<T, D, 2>(a, s);
  if (a.G <= 4) return LaunchSplit<T, D, 4>(a, s);
  return LaunchSplit<T, D, 8>(a, s);
}

template <typename T>
int LaunchD(const Args& a, int64_t D, cudaStream_t s) {
  if (D == 64) return LaunchG<T, 64>(a, s);
  if (D == 128) return LaunchG<T, 128>(a, s);
  if constexpr (sizeof(T) == 2) {
    if (D == 256) return LaunchG<T, 256>(a, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int DecodeAttentionSplits(int64_t max_len, int64_t segments, int num_sms, const DecodeAttentionTuning& tuning) {
  return static_cast<int>(PlanSplits(max_len, segments, num_sms, tuning).splits);
}

bool DecodeAttentionSupported(DType dtype, int64_t G, int64_t D) {
  if (G < 1 || G > 8) return false;
  if (D == 64 || D == 128) return true;
  return D == 256 && dtype != DType::kFloat32;
}

int DecodeAttention(DType dtype, const void* q, int64_t heads, int64_t q_token_stride, const void* k_pool,
                    const void* v_pool, const int32_t* seg_start, const int32_t* seg_len, int64_t n, int64_t G,
                    int64_t D, int64_t max_len, float scale, float* partial_out, float* partial_lse, void* out,
                    int num_sms, void* stream, const DecodeAttentionTuning& tuning) {
  if (n < 0 || heads < 1 || n % heads != 0 || !DecodeAttentionSupported(dtype, G, D))
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
  if (!Aligned16(q) || (q_token_stride * elem) % 16 != 0 || !Aligned16(k_pool) || !Aligned16(v_pool) ||
      !Aligned16(out))
    return static_cast<int>(cudaErrorInvalidValue);
  const SplitPlan plan = PlanSplits(max_len, n, num_sms, tuning);
  if (n * plan.splits > INT32_MAX || (plan.splits > 1 && (partial_out == nullptr || partial_lse == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  const Args a{q,      k_pool, v_pool, seg_start, seg_len, n, heads, q_token_stride, static_cast<int>(G),
               static_cast<int>(plan.splits), plan.chunk, scale * kLog2e, partial_out, partial_lse, out};
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return LaunchD<float>(a, D, s);
    case DType::kFloat16: return LaunchD<__half>(a, D, s);
    case DType::kBFloat16: return LaunchD<__nv_bfloat16>(a, D, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace defkv::kernels
