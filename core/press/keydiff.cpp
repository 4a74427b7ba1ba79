// KeyDiff (spec §3.5): keys least similar to the head's mean normalised key are kept.
#include "core/press/presses.h"

namespace defkv::press {
namespace {

class KeyDiffPress final : public ScorerPress {
 public:
  at::Tensor Score(const LayerInputs& in) override {
    at::Tensor k = in.keys.to(at::kFloat);
    at::Tensor anchor = (k / at::linalg_vector_norm(k, 2, {-1}, true).clamp_min(1e-12)).mean(1, true);
    return -at::cosine_similarity(k, anchor, -1);
  }
};

}  // namespace

std::unique_ptr<Press> MakeKeyDiff() { return std::make_unique<KeyDiffPress>(); }

}  // namespace defkv::press
