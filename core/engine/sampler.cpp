#include "core/engine/sampler.h"

#include <algorithm>
#include <cmath>

namespace defkv::engine {

int32_t Sampler::Next(const float* logits, int64_t vocab) {
  if (params_.temperature <= 0.0) {
    int32_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
    return best;
  }
  auto& c = scratch_;
  c.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) c[i] = {logits[i] / static_cast<float>(params_.temperature), static_cast<int32_t>(i)};
  // Highest first; ids break ties so the order (and the draw) is reproducible.
  auto by_score = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = c.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = params_.top_k;
    std::partial_sort(c.begin(), c.begin() + keep, c.end(), by_score);
  } else {
    std::sort(c.begin(), c.end(), by_score);
  }
  c.resize(keep);
  const float max_logit = c.front().first;
  double total = 0;
  std::vector<double> p(keep);
  for (size_t i = 0; i < keep; ++i) total += p[i] = std::exp(static_cast<double>(c[i].first - max_logit));
  if (params_.top_p < 1.0) {
    // Smallest prefix whose mass reaches top_p (the token that crosses it is kept).
    double cum = 0;
    size_t n = 0;
    while (n < keep) {
      cum += p[n++] / total;
      if (cum >= params_.top_p) break;
    }
    keep = n;
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += p[i];
  }
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return c[i].second;
  }
  return c[keep - 1].second;
}

}  // namespace defkv::engine
