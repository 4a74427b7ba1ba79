#include <map>
#include <vector>

#include <gtest/gtest.h>

#include "core/engine/sampler.h"

namespace defkv::engine {
namespace {

TEST(Sampler, GreedyPicksTheMaxAndTheLowestIdOnTies) {
  std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
  Sampler s({});
  EXPECT_EQ(s.Next(logits.data(), 4), 1);
}

TEST(Sampler, SameSeedSameDrawsDifferentSeedDifferentDraws) {
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.05f * static_cast<float>(i % 7);
  auto draws = [&](uint64_t seed) {
    Sampler s({.temperature = 1.0, .seed = seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.Next(logits.data(), 50));
    return out;
  };
  EXPECT_EQ(draws(7), draws(7));
  EXPECT_NE(draws(7), draws(8));
}

TEST(Sampler, TopKAndTopPRestrictTheCandidates) {
  // Probabilities ~ 0.64, 0.24, 0.09, 0.03 at temperature 1.
  std::vector<float> logits = {3.0f, 2.0f, 1.0f, -0.1f};
  std::map<int32_t, int> seen_k, seen_p;
  Sampler k({.temperature = 1.0, .top_k = 2, .seed = 1});
  Sampler p({.temperature = 1.0, .top_p = 0.8, .seed = 1});
  for (int i = 0; i < 2000; ++i) {
    ++seen_k[k.Next(logits.data(), 4)];
    ++seen_p[p.Next(logits.data(), 4)];
  }
  EXPECT_EQ(seen_k.size(), 2u);  // only ids 0 and 1
  EXPECT_TRUE(seen_k.count(0) && seen_k.count(1));
  EXPECT_EQ(seen_p.size(), 2u);  // 0.64 < 0.8 <= 0.64 + 0.24
  // The top token keeps its relative weight: 0.64 / 0.88 ~ 0.73 of the draws.
  EXPECT_NEAR(seen_p[0] / 2000.0, 0.727, 0.04);
}

TEST(Sampler, LowTemperatureApproachesGreedy) {
  std::vector<float> logits = {1.0f, 1.5f, 0.5f};
  Sampler s({.temperature = 0.01, .seed = 3});
  for (int i = 0; i < 100; ++i) EXPECT_EQ(s.Next(logits.data(), 3), 1);
}

}  // namespace
}  // namespace defkv::engine
