// Factories of every press; the registry (registry.cpp) maps names and options onto them.
#pragma once

#include <cstdint>
#include <memory>

#include "core/press/press.h"

namespace defkv::press {

std::unique_ptr<Press> MakeSnapKV(int64_t window_size, int64_t kernel_size);
std::unique_ptr<Press> MakePyramidKV(int64_t window_size, int64_t kernel_size, int64_t beta);
std::unique_ptr<Press> MakeStreamingLLM(int64_t n_sink);
std::unique_ptr<Press> MakeKnorm();
std::unique_ptr<Press> MakeRandom(int64_t seed);
std::unique_ptr<Press> MakeTova();
std::unique_ptr<Press> MakeObservedAttention();
struct ExpectedAttentionOptions {
  int64_t n_future_positions = 512, n_sink = 4;
  bool use_covariance = true, use_vnorm = true;
  double epsilon = 0;
};
std::unique_ptr<Press> MakeExpectedAttention(const ExpectedAttentionOptions& o);
std::unique_ptr<Press> MakeKeyDiff();
std::unique_ptr<Press> MakeAdaKV(int64_t window_size, int64_t kernel_size, double alpha_safeguard);
std::unique_ptr<Press> MakeCriticalKV(int64_t window_size, int64_t kernel_size, double epsilon,
                                      double first_stage_ratio);
std::unique_ptr<Press> MakeCriticalAdaKV(int64_t window_size, int64_t kernel_size, double alpha_safeguard,
                                         double epsilon, double first_stage_ratio);
// across_layers: Layer-DefensiveKV (one budget for all layers) instead of DefensiveKV.
std::unique_ptr<Press> MakeDefensiveKV(int64_t window_size, int64_t kernel_size, double tau, bool across_layers);

}  // namespace defkv::press
