// ExpectedAttention (spec §3.8): future queries are modelled as a Gaussian fitted to the
// context's pre-RoPE queries, rotated by the RoPE matrix averaged over the next
// n_future_positions positions; a key's score is the softmax of its expected logit (mean and
// covariance terms), mean over the GQA group, times the value norm. The first n_sink tokens are
// kept. The statistics are computed in fp32 whatever the model dtype: in bf16 the covariance
// term loses enough precision to reorder about a tenth of the tokens.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/press/presses.h"

namespace defkv::press {
namespace {

class ExpectedAttentionPress final : public ScorerPress {
 public:
  explicit ExpectedAttentionPress(const ExpectedAttentionOptions& o) : o_(o) {}
  absl::Status CheckContext(int64_t len) const override {
    if (len <= o_.n_sink)
      return absl::InvalidArgumentError(
          absl::StrCat("the context has ", len, " tokens; expected_attention needs more than n_sink=", o_.n_sink));
    return absl::OkStatus();
  }
  int64_t hidden_rows(int64_t) const override { return -1; }

  at::Tensor Score(const LayerInputs& in) override {
    const model::Transformer& m = *in.model;
    const int64_t len = in.context_len(), d = m.config().head_dim, hq = m.config().num_heads;
    const int64_t n = len - o_.n_sink;
    at::Tensor q = m.PreRopeQueries(in.layer, in.hidden.narrow(0, o_.n_sink, n)).to(at::kFloat);  // [H_q, n, D]
    at::Tensor mu = q.mean(1, true);                                                  // [H_q, 1, D]
    at::Tensor cov;
    if (o_.use_covariance) {
      at::Tensor c = q - mu;
      cov = at::matmul(c.transpose(1, 2), c) / static_cast<double>(n);  // [H_q, D, D]
    }
    mu = mu.squeeze(1);
    // Mean rotation over the future positions: R_p = diag(cos_p) + diag(sin_p-by-column) P.
    auto lopts = at::TensorOptions().dtype(at::kLong).device(q.device());
    auto [cos, sin] = m.rope().Tables(at::arange(len, len + o_.n_future_positions, lopts), q.scalar_type());
    at::Tensor eye = at::eye(d, q.options());
    at::Tensor perm = at::zeros({d, d}, q.options());
    perm.narrow(0, d / 2, d / 2).narrow(1, 0, d / 2).copy_(at::eye(d / 2, q.options()));
    perm.narrow(0, 0, d / 2).narrow(1, d / 2, d / 2).copy_(-at::eye(d / 2, q.options()));
    at::Tensor r = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * perm).mean(0);  // [D, D]
    mu = at::matmul(mu, r.t());
    if (cov.defined()) cov = at::matmul(r, at::matmul(cov, r.t()));

    at::Tensor k = in.keys.narrow(1, o_.n_sink, n).to(at::kFloat).repeat_interleave(hq / in.num_kv_heads(), 0);
    at::Tensor s = at::matmul(k, mu.unsqueeze(-1)).squeeze(-1) / std::sqrt(static_cast<double>(d));
    if (cov.defined()) s = s + (at::matmul(k, cov) * k).sum(-1) / static_cast<double>(d) / 2.0;
    s = GroupMean(at::softmax(s, -1), in.num_kv_heads());  // [H, n]
    if (o_.use_vnorm)
      s = (s + o_.epsilon) * at::linalg_vector_norm(in.values.narrow(1, o_.n_sink, n).to(at::kFloat), 2, {-1});
    return PadScores(s, o_.n_sink, s.max().item<double>() + 1, /*at_start=*/true);
  }

 private:
  ExpectedAttentionOptions o_;
};

}  // namespace

std::unique_ptr<Press> MakeExpectedAttention(const ExpectedAttentionOptions& o) {
  return std::make_unique<ExpectedAttentionPress>(o);
}

}  // namespace defkv::press
