// AdaKV (spec §3.9, kvpress AdaKVPress around SnapKV): head-wise budgets inside a layer. Each
// head's top int(n_kept * alpha) entries are secured, then the layer keeps its H * n_kept
// highest entries wherever they fall, so heads with concentrated attention give room to heads
// with diffuse attention. kvpress simulates this with masks; here the entries are evicted.
#include <limits>

#include "core/press/presses.h"
#include "core/press/snapkv.h"

namespace defkv::press {

// Shared with CriticalAdaKV: sets the per-head safeguard entries to the float max, in place.
void ApplySafeguard(at::Tensor& scores, int64_t n_kept, double alpha) {
  int64_t n_safe = static_cast<int64_t>(static_cast<double>(n_kept) * alpha);
  if (alpha > 0) n_safe = n_kept > 0 ? std::max<int64_t>(1, n_safe) : 0;
  if (n_safe == 0) return;
  at::Tensor top = TopKIndices(scores, n_safe);
  scores.scatter_(1, top, std::numeric_limits<float>::max());
}

namespace {

class AdaKVPress final : public Press {
 public:
  AdaKVPress(int64_t w, int64_t k, double alpha) : snap_(w, k), alpha_(alpha) {}
  absl::Status CheckContext(int64_t len) const override { return snap_.CheckContext(len); }
  int64_t hidden_rows(int64_t len) const override { return snap_.hidden_rows(len); }
  std::optional<HeadSelection> CompressLayer(const LayerInputs& in) override {
    at::Tensor s = snap_.Score(in);
    const int64_t n_kept = NKept(in.context_len(), in.compression_ratio);
    ApplySafeguard(s, n_kept, alpha_);
    return FlatTopK(s, in.num_kv_heads() * n_kept);
  }

 private:
  SnapKVPress snap_;
  double alpha_;
};

}  // namespace

std::unique_ptr<Press> MakeAdaKV(int64_t w, int64_t k, double alpha) { return std::make_unique<AdaKVPress>(w, k, alpha); }

}  // namespace defkv::press
