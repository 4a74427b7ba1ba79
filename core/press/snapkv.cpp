#include "core/press/snapkv.h"

#include "core/press/presses.h"

#include <algorithm>
#include <cmath>

namespace defkv::press {

absl::Status SnapKVPress::CheckContext(int64_t context_len) const {
  if (context_len <= window_)
    return absl::InvalidArgumentError(absl::StrCat("the context has ", context_len,
                                                   " tokens; this press needs more than window_size=", window_));
  return absl::OkStatus();
}

at::Tensor SnapKVPress::Score(const LayerInputs& in) {
  // A few kv heads per pass (KvHeadsPerScoringPass bounds the window attention's memory): [H, n].
  const int64_t heads = in.num_kv_heads(), per_pass = KvHeadsPerScoringPass(in, window_);
  std::vector<at::Tensor> rows;
  for (int64_t h = 0; h < heads; h += per_pass) {
    const int64_t k = std::min(per_pass, heads - h);
    at::Tensor pooled = AvgPool(WindowAttention(in, window_, h, k).mean(1), kernel_);  // [k G, w, n] -> [k G, n]
    rows.push_back(pooled.view({k, -1, pooled.size(-1)}).mean(1));                      // [k, n]
  }
  at::Tensor s = at::cat(rows);
  return PadScores(s, window_, s.max().item<double>() + 1);
}

int64_t PyramidKVPress::LayerBudget(int64_t len, double ratio, int64_t window, int64_t beta, int64_t layer,
                                    int64_t num_layers) {
  const double w = static_cast<double>(window), l = static_cast<double>(len);
  const double max_capacity = w + l * (1 - ratio);
  double min_num = (max_capacity - w) / static_cast<double>(beta);
  double max_num = (max_capacity - w) * 2 - min_num;
  if (max_num >= l - w) {
    max_num = l - w;
    min_num = (max_capacity - w) * 2 - max_num;
  }
  // std::nearbyint rounds half to even, like Python's round().
  if (!(l >= max_num && max_num >= min_num && min_num >= w))
    return std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(l * (1 - ratio))));
  const double steps = num_layers > 1 ? (max_num - min_num) / static_cast<double>(num_layers - 1) : 0.0;
  return static_cast<int64_t>(std::nearbyint(max_num - static_cast<double>(layer) * steps));
}

std::optional<HeadSelection> PyramidKVPress::CompressLayer(const LayerInputs& in) {
  const int64_t n = LayerBudget(in.context_len(), in.compression_ratio, window_, beta_, in.layer,
                                in.model->config().num_layers);
  return TopKPerHead(Score(in), n);
}

}  // namespace defkv::press

namespace defkv::press {
std::unique_ptr<Press> MakeSnapKV(int64_t w, int64_t k) { return std::make_unique<SnapKVPress>(w, k); }
std::unique_ptr<Press> MakePyramidKV(int64_t w, int64_t k, int64_t beta) {
  return std::make_unique<PyramidKVPress>(w, k, beta);
}
}  // namespace defkv::press
