// The CUDA half of kv_append.h: one thread per 16-byte piece of a row, K and V alike (the grid's
// y index picks the tensor), so a decode step's whole append is one launch of n * D / 8 threads
// (bf16) per tensor.
#include <cuda_runtime.h>

#include <cstdint>

#ifndef DEFKV_WITH_CUDA
#define DEFKV_WITH_CUDA 1
#endif
#include "kernels/kv_append.h"
#include "kernels/launch.cuh"

namespace defkv::kernels {
namespace {

constexpr int kThreads = 256;

struct Side {
  const char* src;
  int64_t token_stride, head_stride;  // bytes
  char* pool;
};

__global__ void AppendKernel(const Side k, const Side v, int64_t heads, int64_t pieces_per_row, int64_t row_bytes,
                             int64_t total, const int64_t* __restrict__ rows) {
  WaitForPrecedingGrid();  // kernels/launch.cuh
  LetDependentsLaunch();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const Side& s = blockIdx.y == 0 ? k : v;
  const int64_t j = i / pieces_per_row, piece = i % pieces_per_row;
  const char* from = s.src + (j / heads) * s.token_stride + (j % heads) * s.head_stride + piece * 16;
  char* to = s.pool + rows[j] * row_bytes + piece * 16;
  *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
}

bool Multiple16(int64_t v) { return v % 16 == 0; }
bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

int AppendRows(DType dtype, const void* k, int64_t k_token_stride, int64_t k_head_stride, const void* v,
               int64_t v_token_stride, int64_t v_head_stride, int64_t tokens, int64_t heads, int64_t D,
               const int64_t* rows, void* k_pool, void* v_pool, void* stream) {
  const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
  const int64_t row_bytes = D * elem;
  if (tokens < 0 || heads < 1 || D < 1 || !Multiple16(row_bytes)) return static_cast<int>(cudaErrorInvalidValue);
  for (int64_t stride : {k_token_stride, k_head_stride, v_token_stride, v_head_stride})
    if (!Multiple16(stride * elem)) return static_cast<int>(cudaErrorInvalidValue);
  for (const void* p : {k, v, static_cast<const void*>(k_pool), static_cast<const void*>(v_pool)})
    if (!Aligned16(p)) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t pieces = row_bytes / 16, total = tokens * heads * pieces;
  if (total == 0) return 0;
  const Side ks{static_cast<const char*>(k), k_token_stride * elem, k_head_stride * elem, static_cast<char*>(k_pool)};
  const Side vs{static_cast<const char*>(v), v_token_stride * elem, v_head_stride * elem, static_cast<char*>(v_pool)};
  const dim3 grid(static_cast<unsigned>((total + kThreads - 1) / kThreads), 2);
  Launch(kPdlAppend, AppendKernel, grid, kThreads, 0, static_cast<cudaStream_t>(stream), ks, vs, heads, pieces, row_bytes, total,
         rows);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace defkv::kernels
