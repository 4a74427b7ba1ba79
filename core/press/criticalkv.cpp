// CriticalKV and AdaCriticalKV (spec §3.12, kvpress CriticalKVPress / CriticalAdaKVPress around
// SnapKV). Evicting an entry perturbs the head output by about its attention times its value
// after the output projection, so after a first stage chosen by attention alone the budget is
// filled by (score + eps) * ||v W_o||_1. Protected entries become the float max; products with
// it may overflow to +inf, which only keeps them on top (as in the reference).
#include <algorithm>
#include <limits>

#include "core/press/presses.h"
#include "core/press/snapkv.h"

namespace defkv::press {

void ApplySafeguard(at::Tensor& scores, int64_t n_kept, double alpha);  // adakv.cpp

namespace {

constexpr float kMax = std::numeric_limits<float>::max();

// Sets, in each head h, the top counts[h] entries (by `by`) of `scores` to the float max.
void Secure(at::Tensor& scores, const at::Tensor& by, const std::vector<int64_t>& counts) {
  const int64_t most = *std::max_element(counts.begin(), counts.end());
  if (most <= 0) return;
  at::Tensor top = TopKIndices(by, most);
  for (int64_t h = 0; h < scores.size(0); ++h)
    if (counts[h] > 0) scores[h].scatter_(0, top[h].narrow(0, 0, counts[h]), kMax);
}

at::Tensor ValueNorm(const LayerInputs& in) {
  return GroupMean(ProjectedValueNorm(in, in.context_len()), in.num_kv_heads());
}

class CriticalKVPress final : public ScorerPress {
 public:
  CriticalKVPress(int64_t w, int64_t k, double eps, double fsr) : snap_(w, k), eps_(eps), fsr_(fsr) {}
  absl::Status CheckContext(int64_t len) const override { return snap_.CheckContext(len); }
  int64_t hidden_rows(int64_t len) const override { return snap_.hidden_rows(len); }
  at::Tensor Score(const LayerInputs& in) override {
    at::Tensor s = snap_.Score(in);
    const int64_t len = in.context_len();
    int64_t first = static_cast<int64_t>((1 - in.compression_ratio) * static_cast<double>(len) * fsr_);
    if (fsr_ > 0) first = std::max<int64_t>(1, first);
    at::Tensor out = (s + eps_) * ValueNorm(in);
    Secure(out, s, std::vector<int64_t>(in.num_kv_heads(), first));
    return out;
  }

 private:
  SnapKVPress snap_;
  double eps_, fsr_;
};

class CriticalAdaKVPress final : public Press {
 public:
  CriticalAdaKVPress(int64_t w, int64_t k, double alpha, double eps, double fsr)
      : snap_(w, k), alpha_(alpha), eps_(eps), fsr_(fsr) {}
  absl::Status CheckContext(int64_t len) const override { return snap_.CheckContext(len); }
  int64_t hidden_rows(int64_t len) const override { return snap_.hidden_rows(len); }
  std::optional<HeadSelection> CompressLayer(const LayerInputs& in) override {
    const int64_t heads = in.num_kv_heads(), len = in.context_len();
    const int64_t n_kept = NKept(len, in.compression_ratio);
    at::Tensor s = snap_.Score(in);
    ApplySafeguard(s, n_kept, alpha_);
    // AdaKV budgets from the safeguarded base scores.
    at::Tensor flat = TopKIndices(s.reshape({-1}), heads * n_kept);
    std::vector<int64_t> budget = CountPerHead(flat, heads, len);
    // Stage 1: a first_stage_ratio share of each budget by the base scores.
    std::vector<int64_t> first(heads);
    for (int64_t h = 0; h < heads; ++h) first[h] = static_cast<int64_t>(static_cast<double>(budget[h]) * fsr_);
    at::Tensor staged = s.clone();
    Secure(staged, s, first);
    // Stage 2: the rest of each budget by score x projected value norm.
    at::Tensor weighted = (staged + eps_) * ValueNorm(in);
    at::Tensor final_scores = weighted.clone();
    Secure(final_scores, weighted, budget);
    return FlatTopK(final_scores, heads * n_kept);
  }

 private:
  SnapKVPress snap_;
  double alpha_, eps_, fsr_;
};

}  // namespace

std::unique_ptr<Press> MakeCriticalKV(int64_t w, int64_t k, double eps, double fsr) {
  return std::make_unique<CriticalKVPress>(w, k, eps, fsr);
}
std::unique_ptr<Press> MakeCriticalAdaKV(int64_t w, int64_t k, double alpha, double eps, double fsr) {
  return std::make_unique<CriticalAdaKVPress>(w, k, alpha, eps, fsr);
}

}  // namespace defkv::press
