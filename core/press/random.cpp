// Random (spec §3.5): uniform scores from a seeded generator; a baseline. The draws are made on
// the CPU in fp32 whatever the model's device and dtype, so a seed keeps the same entries
// everywhere; they equal torch.rand with a generator seeded the same way (kvpress on fp32).
#include <ATen/CPUGeneratorImpl.h>

#include "core/press/presses.h"

namespace defkv::press {
namespace {

class RandomPress final : public ScorerPress {
 public:
  explicit RandomPress(int64_t seed) : seed_(seed) {}
  at::Tensor Score(const LayerInputs& in) override {
    // A fresh generator per layer, as kvpress seeds one per score() call.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed_));
    return at::rand({in.num_kv_heads(), in.context_len()}, gen, at::TensorOptions().dtype(at::kFloat))
        .to(in.keys.device());
  }

 private:
  int64_t seed_;
};

}  // namespace

std::unique_ptr<Press> MakeRandom(int64_t seed) { return std::make_unique<RandomPress>(seed); }

}  // namespace defkv::press
