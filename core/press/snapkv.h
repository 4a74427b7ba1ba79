// SnapKV and PyramidKV (spec §3.1, §3.3). Declared in a header because the AdaKV and
// CriticalKV wrappers score with SnapKV.
#pragma once

#include "absl/strings/str_cat.h"
#include "core/press/press.h"

namespace defkv::press {

class SnapKVPress : public ScorerPress {
 public:
  SnapKVPress(int64_t window_size, int64_t kernel_size) : window_(window_size), kernel_(kernel_size) {}
  absl::Status CheckContext(int64_t context_len) const override;
  int64_t hidden_rows(int64_t) const override { return window_; }
  // Mean window attention, pooled, mean over the GQA group; the window is padded with
  // max + 1 so it is always kept (kvpress upstream).
  at::Tensor Score(const LayerInputs& in) override;

 protected:
  int64_t window_, kernel_;
};

class PyramidKVPress final : public SnapKVPress {
 public:
  PyramidKVPress(int64_t window_size, int64_t kernel_size, int64_t beta)
      : SnapKVPress(window_size, kernel_size), beta_(beta) {}
  std::optional<HeadSelection> CompressLayer(const LayerInputs& in) override;
  // Per-layer kept count: linear from max_num at layer 0 down to min_num at the last layer.
  static int64_t LayerBudget(int64_t context_len, double ratio, int64_t window, int64_t beta, int64_t layer,
                             int64_t num_layers);

 private:
  int64_t beta_;
};

}  // namespace defkv::press
