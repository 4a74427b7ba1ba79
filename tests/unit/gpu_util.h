// Helpers shared by the GPU tests (gpu_test.cpp, gpu_gemv_test.cpp, gpu_value_norm_test.cpp).
#pragma once

#include <cstdint>
#include <random>

#include <ATen/ATen.h>

namespace defkv::testing {

// A fresh seed per run (printed with the result, to replay a failure): inputs differ each run.
inline uint64_t FreshSeed() {
  const uint64_t seed = std::random_device{}();
  at::manual_seed(seed);
  return seed;
}

// ||out - ref|| / ||ref||, in double on the CPU.
inline double RelErr(const at::Tensor& out, const at::Tensor& ref) {
  auto o = out.to(at::kCPU, at::kDouble), r = ref.to(at::kCPU, at::kDouble);
  return (o - r).norm().item<double>() / r.norm().item<double>();
}

}  // namespace defkv::testing
