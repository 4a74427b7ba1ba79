// Helpers shared by the GPU tests (gpu_test.cpp, gpu_gemv_test.cpp, gpu_value_norm_test.cpp).
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>

#include <ATen/ATen.h>

#include "core/model/transformer.h"

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

// A random bf16 model on the GPU, small enough for any test (hidden 256, 2 layers, 4 query
// heads of 64 over 2 kv heads, vocab 1000), of one family: "llama", "qwen2" (qkv bias) or
// "qwen3" (q/k norms).
inline absl::StatusOr<std::unique_ptr<model::Transformer>> TinyBf16Model(const std::string& model_type,
                                                                        uint64_t seed) {
  model::ModelConfig c;
  c.model_type = model_type;
  c.vocab_size = 1000, c.hidden_size = 256, c.intermediate_size = 512, c.num_layers = 2;
  c.num_heads = 4, c.num_kv_heads = 2, c.head_dim = 64, c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.qkv_bias = model_type == "qwen2";
  c.qk_norm = model_type == "qwen3";
  model::LoadOptions o;
  o.device = at::kCUDA;
  o.dtype = at::kBFloat16;
  return model::Transformer::Random(c, o, seed);
}

}  // namespace defkv::testing
