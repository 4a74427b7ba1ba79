// ObservedAttention (spec §3.7, H2O-like): the average attention each context token received
// from the context queries that can see it, mean over the GQA group. The prefill attention
// probabilities are recomputed here, a block of queries at a time.
#include <cmath>
#include <limits>

#include "core/press/presses.h"

namespace defkv::press {
namespace {

class ObservedAttentionPress final : public ScorerPress {
 public:
  int64_t hidden_rows(int64_t) const override { return -1; }
  at::Tensor Score(const LayerInputs& in) override {
    const model::Transformer& m = *in.model;
    const int64_t len = in.context_len(), hq = m.config().num_heads;
    const double scale = 1.0 / std::sqrt(static_cast<double>(m.config().head_dim));
    auto lopts = at::TensorOptions().dtype(at::kLong).device(in.keys.device());
    at::Tensor q = m.PreRopeQueries(in.layer, in.hidden);
    auto [cos, sin] = m.rope().Tables(at::arange(0, len, lopts), q.scalar_type());
    q = model::Rope::Apply(q, cos, sin);
    at::Tensor kt = in.keys.repeat_interleave(hq / in.num_kv_heads(), 0).transpose(1, 2);  // [H_q, D, L]
    at::Tensor received = at::zeros({hq, len}, in.keys.options().dtype(at::kFloat));
    constexpr int64_t kBlock = 256;
    for (int64_t b = 0; b < len; b += kBlock) {
      const int64_t rows = std::min(kBlock, len - b);
      at::Tensor logits = (at::matmul(q.narrow(1, b, rows), kt) * scale).to(at::kFloat);
      at::Tensor future = at::arange(0, len, lopts).unsqueeze(0) > at::arange(b, b + rows, lopts).unsqueeze(1);
      logits.masked_fill_(future, -std::numeric_limits<float>::infinity());
      received += at::softmax(logits, -1).sum(1);
    }
    // Token t is seen by the L - t queries at or after it.
    at::Tensor seen_by = at::arange(len, 0, -1, received.options());
    return GroupMean(received / seen_by, in.num_kv_heads());
  }
};

}  // namespace

std::unique_ptr<Press> MakeObservedAttention() { return std::make_unique<ObservedAttentionPress>(); }

}  // namespace defkv::press
