// StreamingLLM (spec §3.4): the first n_sink tokens and the most recent ones.
#include "absl/strings/str_cat.h"
#include "core/press/presses.h"

namespace defkv::press {
namespace {

class StreamingLLMPress final : public ScorerPress {
 public:
  explicit StreamingLLMPress(int64_t n_sink) : n_sink_(n_sink) {}
  absl::Status CheckContext(int64_t len) const override {
    if (len <= n_sink_)
      return absl::InvalidArgumentError(
          absl::StrCat("the context has ", len, " tokens; streaming_llm needs more than n_sink=", n_sink_));
    return absl::OkStatus();
  }
  at::Tensor Score(const LayerInputs& in) override {
    const int64_t len = in.context_len();
    const int64_t n_pruned = len - static_cast<int64_t>(static_cast<double>(len) * (1 - in.compression_ratio));
    at::Tensor s = at::ones({in.num_kv_heads(), len}, at::TensorOptions().dtype(at::kFloat).device(in.keys.device()));
    s.narrow(1, n_sink_, std::min(n_pruned, len - n_sink_)).zero_();
    return s;
  }

 private:
  int64_t n_sink_;
};

}  // namespace

std::unique_ptr<Press> MakeStreamingLLM(int64_t n_sink) { return std::make_unique<StreamingLLMPress>(n_sink); }

}  // namespace defkv::press
