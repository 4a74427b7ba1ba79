// Kernel launches with programmatic dependent launch (PDL, sm_90): a kernel launched this way may
// start while the kernel before it on the stream is still finishing, so a decode step's ~11
// small kernels per layer do not each pay a full drain-and-launch gap. Included by the .cu files
// only.
//
// The contract every kernel launched through Launch() keeps:
// - It calls WaitForPrecedingGrid() before it reads anything an earlier kernel wrote and before
//   it writes anything (an earlier kernel may still be reading the memory it reuses). Only
//   inputs that no kernel writes (weights) may be read before the wait.
// - Every thread that reads or writes such memory waits; a thread may skip the wait only when
//   it touches nothing at all. The wait returns at once when there is nothing to wait for.
// - It calls LetDependentsLaunch() after its wait, never before: the next kernel then starts at
//   most one kernel ahead, and its own wait holds it until this one has finished and its writes
//   are visible. Because every kernel waits before it finishes, finishing implies that all the
//   kernels before it have finished too.
// Stream capture turns these launches into programmatic edges of the CUDA graph. DEFKV_PDL=0 in
// the environment (or a device below sm_90) launches them as ordinary kernels; the waits and
// triggers are then no-ops.
// What the kernel just before wrote must not be read through the non-coherent read-only path
// (ld.global.nc, which a const __restrict__ pointer may compile to): that path promises data
// constant for the kernel's whole life, and such loads may be moved above the wait. Seen on the
// H200 (2026-11-29): with the GEMV reading x that way, Gpu.DecodeGraphsEqualEagerSteps gave other
// tokens in graphs than in eager steps in 10 of 12 runs; with coherent loads, in none of 8 (a
// build that laid the same loads out otherwise also passed 16 of 16: it depends on the code the
// compiler makes). Use LoadCoherent, or coherent loads of one's own.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "kernels/device_info.h"

namespace defkv::kernels {

__device__ __forceinline__ void WaitForPrecedingGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void LetDependentsLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// *p through the coherent path (ld.global.cg: L2, not L1 or the read-only cache), for what the
// kernel just before this one wrote. A plain load through a const __restrict__ pointer may be
// compiled to ld.global.nc, whose data must be constant for the kernel's whole life, and such a
// load may be moved above WaitForPrecedingGrid; this one may not. P is 2, 4, 8 or 16 bytes.
template <typename P>
__device__ __forceinline__ P LoadCoherent(const P* p) {
  static_assert(sizeof(P) == 2 || sizeof(P) == 4 || sizeof(P) == 8 || sizeof(P) == 16, "LoadCoherent: size");
  union {
    P value;
    unsigned short u2;
    unsigned u4;
    uint2 u8;
    uint4 u16;
  } r;
  if constexpr (sizeof(P) == 2)
    r.u2 = __ldcg(reinterpret_cast<const unsigned short*>(p));
  else if constexpr (sizeof(P) == 4)
    r.u4 = __ldcg(reinterpret_cast<const unsigned*>(p));
  else if constexpr (sizeof(P) == 8)
    r.u8 = __ldcg(reinterpret_cast<const uint2*>(p));
  else
    r.u16 = __ldcg(reinterpret_cast<const uint4*>(p));
  return r.value;
}

// The kinds of kernel, one bit each (DEFKV_PDL may name a mask of them; device_info.h).
enum : unsigned {
  kPdlRmsNorm = 2,
  kPdlAddRmsNorm = 4,
  kPdlRope = 8,
  kPdlSiluMul = 16,
  kPdlAppend = 32,
  kPdlDecodeAttention = 64,
  kPdlGemv = 128,
};

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialisation when
// DependentLaunch(kind) says so. Returns the launch's error code.
template <typename... Params, typename... Args>
cudaError_t Launch(unsigned kind, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  if (DependentLaunch(kind)) {
    config.attrs = attr;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace defkv::kernels
