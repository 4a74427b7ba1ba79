// Float conversions of the kernels' element types (fp32, fp16, bf16), round to nearest even:
// Num<T>::ToFloat and Num<T>::FromFloat, as ATen converts. Included by the .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace defkv::kernels {

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ float ToFloat(float v) { return v; }
  static __device__ float FromFloat(float v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ float ToFloat(__half v) { return __half2float(v); }
  static __device__ __half FromFloat(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 FromFloat(float v) { return __float2bfloat16_rn(v); }
};

// Rounds a float to T and back: what storing an intermediate ATen tensor of dtype T does.
template <typename T>
__device__ float Round(float v) {
  return Num<T>::ToFloat(Num<T>::FromFloat(v));
}

// The MLP's SiLU gate of one element, rounded as ATen rounds at::silu(g) * u: silu is
// g / (1 + expf(-g)) in float (expf and an IEEE division, as nvcc compiles them without fast
// math) rounded to T, and the product with u is rounded again. g and u are values of T.
template <typename T>
__device__ T SiluGate(float g, float u) {
  const float silu = Round<T>(__fdiv_rn(g, __fadd_rn(1.f, expf(-g))));
  return Num<T>::FromFloat(__fmul_rn(silu, u));
}

}  // namespace defkv::kernels
