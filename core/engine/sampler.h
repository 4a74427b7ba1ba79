// Picks the next token from fp32 logits: greedy, or temperature / top-k / top-p sampling with
// a seeded generator owned by the request (same seed, same choices).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "core/engine/generator.h"

namespace defkv::engine {

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  // logits: vocab-sized scores.
  int32_t Next(const float* logits, int64_t vocab);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

}  // namespace defkv::engine
