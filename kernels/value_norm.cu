// The CUDA half of value_norm.h. The reference is ProjectedValueNorm's ATen path
// (core/press/common.cpp): bmm of [rows, D] value blocks with W_o^(h) [D, hidden], abs, sum.
//
// One block of 8 warps per (query head h, tile of kRows tokens); grid (token tiles, hq), so the
// blocks running together share a head and its 2 * hidden * D bytes of w_o stay in L2. Per head
// this is the GEMM P = A B with A = V[g(h), tile] [kRows, D] (row-major, K = D contiguous) and
// B[c][e] = w_o[e, h * D + c] [D, hidden]: each output column e of B is D contiguous elements of
// a w_o row, i.e. B is "col" (K-major) for mma.sync.m16n8k16.row.col, which reads both operands
// from K-contiguous shared rows with ldmatrix (no transpose). The epilogue needs no P: every
// 16-column slice of P lives in registers only long enough to add |P| into per-row fp32 sums.
//
// - The warps form a 4 (rows) x 2 (columns) grid. A warp owns kWarpRows token rows and loads its
//   A fragments (the whole K = D) into registers once: kWarpRows * D / 64 = 128 registers per
//   thread (64 for D = 64). A is reused across all of hidden, so only B streams through shared
//   memory: a warp reads one byte of B per kWarpRows flops, which keeps mma.sync, not shared
//   memory bandwidth, the limit.
// - B streams in stages of kCols = 64 columns (hidden must be a multiple of 64), kStages deep,
//   with cp.async (16-byte copies, L2 only) issued kStages - 1 stages ahead; one __syncthreads
//   per stage. Each warp takes 32 columns of a stage, 16 at a time: for every k step one
//   ldmatrix.x4 gives the B fragments of two n8 tiles, used by 2 * kWarpRows / 16 mma.
// - Shared rows are padded by 16 bytes (D + 8 elements): the 8 rows an ldmatrix phase reads land
//   in 8 distinct 16-byte bank groups, so ldmatrix and cp.async are conflict-free.
// - Token rows past n are zero-filled by cp.async (src-size 0), give sums of 0 and are not
//   written. At the end each row sum is reduced over the 4 lanes of a quad (shuffles) and the 2
//   column warps (shared memory), then rounded once to the dtype and stored as fp32.
//
// Expected speed, not yet measured (bf16, D = 128, hidden = 4096, hq = 32, n = 32768: 1.1 TFLOP;
// gpu_value_norm_test prints the measured one): one block per SM (244 registers per thread with
// nvcc 13.0, no spills), 4096 blocks; the 1 MB of w_o per head is read from L2 once per 256
// tokens (~4.3 GB of L2 reads per layer). The bound is mma.sync's rate on Hopper (roughly half to
// two thirds of the ~990 TFLOP/s that only wgmma reaches), less the per-block prologue (a 64 KB
// V tile from HBM, not overlapped: one block per SM) and the last partial wave (~3%).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// Only CUDA builds compile this file, and they define this; a standalone nvcc check may not.
#ifndef DEFKV_WITH_CUDA
#define DEFKV_WITH_CUDA 1
#endif
#include "kernels/value_norm.h"

namespace defkv::kernels {
namespace {

constexpr int kWarpsM = 4;  // warps along the token rows of a block
constexpr int kWarpsN = 2;  // warps along the columns of a stage
constexpr int kThreads = kWarpsM * kWarpsN * 32;
constexpr int kCols = 64;  // w_o rows (P columns) per stage: hidden % kCols == 0

// The tile shape for head dim D (the GEMM's K).
template <int D>
struct Tile {
  static_assert(D % 16 == 0 && D <= 256, "D is a multiple of the mma K (16), at most 256");
  // Token rows per warp: its A fragments take kWarpRows * D / 64 registers (128 at most).
  static constexpr int kWarpRows = D <= 128 ? 64 : 32;
  static constexpr int kRows = kWarpsM * kWarpRows;  // token rows per block
  static constexpr int kMTiles = kWarpRows / 16;     // m16 tiles per warp
  static constexpr int kKSteps = D / 16;             // k16 steps
  static constexpr int kLd = D + 8;                  // padded shared row, elements
  static constexpr int kStages = D <= 128 ? 4 : 3;   // 70 KB of B stages for D = 128
  static constexpr int kSmemBytes = (kRows + kStages * kCols) * kLd * 2;
  static constexpr int kChunksPerRow = D / 8;  // 16-byte copies per row
  static_assert((kRows * kChunksPerRow) % kThreads == 0 && (kCols * kChunksPerRow) % kThreads == 0,
                "tiles copy evenly over the block");
};

template <typename T>
struct Num;
template <>
struct Num<__half> {
  static __device__ float Round(float v) { return __half2float(__float2half_rn(v)); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ float Round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

// c += a b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (src is not read).
__device__ __forceinline__ void CopyAsync16(uint32_t smem_addr, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void WaitAsync() {
  asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
}

// Block (token tile blockIdx.x, query head blockIdx.y). v: [kv_heads, n, D] (head stride
// stride_head, rows contiguous); w_o: [hidden, ldw] with ldw = hq * D; out: [hq, n].
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    ValueNormKernel(const T* __restrict__ v, int64_t n, int64_t stride_head, int group, const T* __restrict__ w_o,
                    int64_t ldw, int hidden, float* __restrict__ out) {
  using C = Tile<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float row_part[kWarpsN][C::kRows];  // per column warp, the row sums of the block
  const uint32_t a_smem = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t b_smem = a_smem + C::kRows * C::kLd * 2;
  constexpr uint32_t kStageBytes = kCols * C::kLd * 2;

  const int h = blockIdx.y;
  const int64_t t0 = int64_t{blockIdx.x} * C::kRows;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  const T* v_head = v + (h / group) * stride_head;
  const T* w_head = w_o + int64_t{h} * D;

  // A: the block's token rows of V, zeros past n.
#pragma unroll
  for (int i = 0; i < C::kRows * C::kChunksPerRow / kThreads; ++i) {
    const int chunk = i * kThreads + tid, r = chunk / C::kChunksPerRow, c = chunk % C::kChunksPerRow;
    const bool in = t0 + r < n;
    CopyAsync16(a_smem + (r * C::kLd + c * 8) * 2, v_head + (in ? (t0 + r) * D + c * 8 : 0), in ? 16 : 0);
  }
  CommitAsync();
  // B stage `slot` <- w_o rows [tile * kCols, (tile + 1) * kCols), this head's D columns.
  const auto load_b = [&](int slot, int tile) {
#pragma unroll
    for (int i = 0; i < kCols * C::kChunksPerRow / kThreads; ++i) {
      const int chunk = i * kThreads + tid, r = chunk / C::kChunksPerRow, c = chunk % C::kChunksPerRow;
      CopyAsync16(b_smem + slot * kStageBytes + (r * C::kLd + c * 8) * 2,
                  w_head + (int64_t{tile} * kCols + r) * ldw + c * 8, 16);
    }
  };
  const int tiles = hidden / kCols;
  // One commit per stage, empty ones too, so that the group count stays uniform for WaitAsync.
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < tiles) load_b(s, s);
    CommitAsync();
  }

  // A fragments of the warp's rows for every k step, kept for the whole block.
  WaitAsync<C::kStages - 1>();  // the first group: A
  __syncthreads();
  uint32_t a[C::kMTiles][C::kKSteps][4];
#pragma unroll
  for (int i = 0; i < C::kMTiles; ++i) {
#pragma unroll
    for (int k = 0; k < C::kKSteps; ++k) {
      // Matrices: rows 0-7 / 8-15 of the m16 tile (lanes 0-15), k 0-7 / 8-15 (lanes 16-31).
      const int row = wm * C::kWarpRows + i * 16 + (lane & 15);
      LdMatrixX4(a[i][k], a_smem + (row * C::kLd + k * 16 + (lane >> 4) * 8) * 2);
    }
  }

  // The thread's rows: wm * kWarpRows + i * 16 + lane / 4 (j = 0) and + 8 (j = 1).
  float rows[C::kMTiles][2] = {};
  // B matrices of one ldmatrix.x4: n 0-7 / 8-15 of the 16 columns (lanes 0-15 / 16-31), k 0-7 /
  // 8-15 (lane bit 3): registers {0, 1} are the fragment of n8 tile 0, {2, 3} of tile 1.
  const uint32_t b_lane = (((lane >> 4) * 8 + (lane & 7)) * C::kLd + ((lane >> 3) & 1) * 8) * 2;

  for (int tile = 0; tile < tiles; ++tile) {
    WaitAsync<C::kStages - 2>();  // stage `tile` has landed (this thread's copies)
    __syncthreads();              // everyone's copies; everyone is done with stage tile - 1
    const int next = tile + C::kStages - 1;
    if (next < tiles) load_b(next % C::kStages, next);  // into the slot of stage tile - 1
    CommitAsync();

    const uint32_t stage = b_smem + (tile % C::kStages) * kStageBytes;
#pragma unroll
    for (int nb = 0; nb < kCols / kWarpsN; nb += 16) {
      float acc[C::kMTiles][2][4] = {};
      const uint32_t b_addr = stage + (wn * (kCols / kWarpsN) + nb) * C::kLd * 2 + b_lane;
#pragma unroll
      for (int k = 0; k < C::kKSteps; ++k) {
        uint32_t b[4];
        LdMatrixX4(b, b_addr + k * 16 * 2);
#pragma unroll
        for (int i = 0; i < C::kMTiles; ++i) {
          Mma<T>(acc[i][0], a[i][k], b[0], b[1]);
          Mma<T>(acc[i][1], a[i][k], b[2], b[3]);
        }
      }
      // Accumulator element q of n8 tile j: row lane / 4 (+ 8 for q >= 2), column 2 (lane % 4) + q % 2.
#pragma unroll
      for (int i = 0; i < C::kMTiles; ++i) {
        rows[i][0] += (fabsf(acc[i][0][0]) + fabsf(acc[i][0][1])) + (fabsf(acc[i][1][0]) + fabsf(acc[i][1][1]));
        rows[i][1] += (fabsf(acc[i][0][2]) + fabsf(acc[i][0][3])) + (fabsf(acc[i][1][2]) + fabsf(acc[i][1][3]));
      }
    }
  }

  // The 4 lanes of a quad hold the same rows (different columns); then the 2 column warps.
#pragma unroll
  for (int i = 0; i < C::kMTiles; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float s = rows[i][j];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (lane % 4 == 0) row_part[wn][wm * C::kWarpRows + i * 16 + j * 8 + lane / 4] = s;
    }
  }
  __syncthreads();
  for (int r = tid; r < C::kRows; r += kThreads) {
    float s = row_part[0][r];
#pragma unroll
    for (int w = 1; w < kWarpsN; ++w) s += row_part[w][r];
    if (t0 + r < n) out[int64_t{h} * n + t0 + r] = Num<T>::Round(s);
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int D>
int Launch(const void* v, int64_t n, int64_t stride_head, int group, const void* w_o, int64_t hq, int64_t hidden,
           float* out, cudaStream_t stream) {
  using C = Tile<D>;
  const auto kernel = ValueNormKernel<T, D>;
  // More than the default 48 KB of dynamic shared memory must be asked for (per kernel).
  if (const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
      e != cudaSuccess)
    return static_cast<int>(e);
  const dim3 grid(static_cast<unsigned>((n + C::kRows - 1) / C::kRows), static_cast<unsigned>(hq));
  kernel<<<grid, kThreads, C::kSmemBytes, stream>>>(static_cast<const T*>(v), n, stride_head, group,
                                                    static_cast<const T*>(w_o), hq * D, static_cast<int>(hidden), out);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int LaunchD(const void* v, int64_t n, int64_t stride_head, int group, const void* w_o, int64_t hq, int64_t D,
            int64_t hidden, float* out, cudaStream_t s) {
  switch (D) {
    case 64: return Launch<T, 64>(v, n, stride_head, group, w_o, hq, hidden, out, s);
    case 128: return Launch<T, 128>(v, n, stride_head, group, w_o, hq, hidden, out, s);
    case 256: return Launch<T, 256>(v, n, stride_head, group, w_o, hq, hidden, out, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

bool ValueNormSupported(DType dtype, int64_t D) {
  return dtype != DType::kFloat32 && (D == 64 || D == 128 || D == 256);
}

int ValueNormL1(DType dtype, const void* v, int64_t kv_heads, int64_t n, int64_t stride_head, const void* w_o,
                int64_t hq, int64_t D, int64_t hidden, float* out, void* stream) {
  if (!ValueNormSupported(dtype, D) || kv_heads < 1 || hq < kv_heads || hq % kv_heads != 0 || hq > 65535 || n < 0 ||
      hidden <= 0 || hidden % kCols != 0 || hidden > INT32_MAX || stride_head % 8 != 0 || !Aligned16(v) ||
      !Aligned16(w_o))
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  const int group = static_cast<int>(hq / kv_heads);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16: return LaunchD<__half>(v, n, stride_head, group, w_o, hq, D, hidden, out, s);
    case DType::kBFloat16: return LaunchD<__nv_bfloat16>(v, n, stride_head, group, w_o, hq, D, hidden, out, s);
    case DType::kFloat32: break;
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace defkv::kernels
