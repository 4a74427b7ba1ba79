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

}  // namespace defkv::kernels
