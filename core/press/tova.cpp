// TOVA (spec §3.6): attention of the last context token, averaged over all query heads, the
// same scores for every kv head; the last token is kept.
#include "absl/strings/str_cat.h"
#include "core/press/presses.h"

namespace defkv::press {
namespace {

class TovaPress final : public ScorerPress {
 public:
  absl::Status CheckContext(int64_t len) const override {
    if (len < 2) return absl::InvalidArgumentError("tova needs a context of at least 2 tokens");
    return absl::OkStatus();
  }
  int64_t hidden_rows(int64_t) const override { return 1; }
  at::Tensor Score(const LayerInputs& in) override {
    at::Tensor a = WindowAttention(in, 1);  // [H_q, 1, L - 1]
    at::Tensor s = a.mean(0).expand({in.num_kv_heads(), a.size(2)}).contiguous();
    return PadScores(s, 1, s.max().item<double>() + 1);
  }
};

}  // namespace

std::unique_ptr<Press> MakeTova() { return std::make_unique<TovaPress>(); }

}  // namespace defkv::press
