// Knorm (spec §3.5): keys of low L2 norm are kept.
#include "core/press/presses.h"

namespace defkv::press {
namespace {

class KnormPress final : public ScorerPress {
 public:
  at::Tensor Score(const LayerInputs& in) override { return -at::linalg_vector_norm(in.keys.to(at::kFloat), 2, {-1}); }
};

}  // namespace

std::unique_ptr<Press> MakeKnorm() { return std::make_unique<KnormPress>(); }

}  // namespace defkv::press
