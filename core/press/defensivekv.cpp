// DefensiveKV: defensive aggregation (worst case over the observed queries, lifted to the
// head's mean as a prior) weighted by the head's share of the projected value norm, with
// attention-mass protection and AdaKV-style budgets inside the layer. Layer-DefensiveKV scores
// the same way and lets all layers compete for one budget.
#include "core/press/defensivekv.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/press/presses.h"

namespace defkv::press {
namespace defensive {

at::Tensor DefensiveAggregate(const at::Tensor& attn, int64_t num_kv_heads, int64_t kernel_size, at::Tensor* m_out,
                              at::Tensor* mu_out) {
  const int64_t hq = attn.size(0), w = attn.size(1), n = attn.size(2);
  at::Tensor base = attn.sum(-1, true);
  // In place from here: at 128K one kv head's [G, w, n] is 134 MB, and the expression
  // where(mass > 0, pooled * base / mass, 0) held four of them at once.
  at::Tensor renorm = AvgPool(attn, kernel_size);
  at::Tensor mass = renorm.sum(-1, true);
  renorm.mul_(base).div_(mass);
  renorm.masked_fill_(mass.gt(0).logical_not(), 0);  // a row with no mass stays all zero, not 0/0
  at::Tensor m = renorm.view({num_kv_heads, hq / num_kv_heads * w, n}).amax(1);  // max over G and window
  at::Tensor mu = m.mean(-1, true);
  if (m_out) *m_out = m;
  if (mu_out) *mu_out = mu.squeeze(-1);
  return at::maximum(m, mu);
}

HeadSelection StageOneProtected(const at::Tensor& abar, double tau, double beta, int64_t cap) {
  const double threshold = tau - beta;
  cap = std::max<int64_t>(0, cap);
  const int64_t n = abar.size(1);
  // Every head at once: p per head, sorted descending, and the count of leading entries before
  // the cumulative sum first reaches the threshold. Sums of non-negative terms never decrease,
  // so those are exactly the entries below it; none reaching it (or a head without mass, whose
  // sums are NaN) protects nothing.
  at::Tensor p = abar / abar.sum(-1, /*keepdim=*/true);
  const at::Tensor order = SortDescendingIndices(p);
  const at::Tensor sorted = p.gather(-1, order);
  at::Tensor below = (sorted.cumsum(-1) < threshold).sum(-1);
  at::Tensor count = at::where(below < n, below, at::zeros_like(below)).clamp_max(cap).to(at::kCPU);
  const auto c = count.accessor<int64_t, 1>();
  HeadSelection out;
  for (int64_t g = 0; g < abar.size(0); ++g) out.push_back(order[g].narrow(0, 0, c[g]));
  return out;
}

at::Tensor LayerScores(const LayerInputs& in, int64_t window, int64_t kernel_size, double tau) {
  const int64_t len = in.context_len(), n = len - window, heads = in.num_kv_heads();
  const int64_t tail = std::min(window, n);
  // A few kv heads per pass, on the window attention of their query heads ([k G, w, n]; the
  // fp32 temporaries of all heads at once are 1.3 GB at 128K, KvHeadsPerScoringPass bounds
  // them): (a) the tail mass of each window row, for beta, (b) the raw attention for stage 1,
  // (c)-(d) the defensive aggregation.
  const int64_t per_pass = KvHeadsPerScoringPass(in, window);
  std::vector<at::Tensor> tails, abars, aggregates;
  for (int64_t h = 0; h < heads; h += per_pass) {
    const int64_t k = std::min(per_pass, heads - h);
    at::Tensor a = WindowAttention(in, window, h, k);
    tails.push_back(a.narrow(2, n - tail, tail).sum(-1));  // [k G, w]
    abars.push_back(a.mean(1).view({k, -1, n}).mean(1));  // [k, n]
    aggregates.push_back(DefensiveAggregate(a, k, kernel_size));
  }
  // beta: mass on the last w non-window tokens (the reference's choice, kept for parity), the
  // mean over every query head's window rows.
  const double beta = at::cat(tails).mean().item<double>();
  at::Tensor abar = at::cat(abars);
  at::Tensor s = at::cat(aggregates);
  // (e) value-norm share across kv heads.
  at::Tensor vnorm = GroupMean(ProjectedValueNorm(in, n), heads);
  s = s * (vnorm / vnorm.sum(0, true));
  // (f) stage-1 tokens and (g) the window get the layer's maximum.
  const double s_max = s.max().item<double>();
  const auto cap = static_cast<int64_t>(static_cast<double>(n) * (1.0 - in.compression_ratio) - static_cast<double>(window));
  HeadSelection prot = StageOneProtected(abar, tau, beta, cap);
  for (int64_t g = 0; g < heads; ++g)
    if (prot[g].numel() > 0) s[g].index_fill_(0, prot[g], s_max);
  return PadScores(s, window, s_max);
}

}  // namespace defensive

namespace {

class DefensiveKVPress final : public Press {
 public:
  DefensiveKVPress(int64_t w, int64_t k, double tau, bool across_layers)
      : window_(w), kernel_(k), tau_(tau), across_layers_(across_layers) {}
  absl::Status CheckContext(int64_t len) const override {
    if (len <= window_)
      return absl::InvalidArgumentError(
          absl::StrCat("the context has ", len, " tokens; this press needs more than window_size=", window_));
    return absl::OkStatus();
  }
  int64_t hidden_rows(int64_t) const override { return window_; }

  std::optional<HeadSelection> CompressLayer(const LayerInputs& in) override {
    at::Tensor s = defensive::LayerScores(in, window_, kernel_, tau_);
    const double per_layer = static_cast<double>(in.context_len()) * (1.0 - in.compression_ratio) *
                             static_cast<double>(in.num_kv_heads());
    if (!across_layers_) return FlatTopK(s, static_cast<int64_t>(per_layer));
    total_ = static_cast<int64_t>(per_layer * static_cast<double>(in.model->config().num_layers));
    heads_ = s.size(0), len_ = s.size(1);
    cand_scores_.push_back(s.reshape({-1}));
    cand_flat_.push_back(at::arange(s.numel(), at::TensorOptions().dtype(at::kLong).device(s.device())));
    cand_layer_.push_back(in.layer);
    handed_.push_back(s.numel());
    return Prune();
  }

  bool narrows_layers() const override { return across_layers_; }

  // Layer-DefensiveKV: the global top entries over every layer's flattened scores, as original
  // positions per (layer, head); the Compressor maps them into layers it has already pruned.
  std::vector<HeadSelection> Finish() override {
    std::vector<HeadSelection> out;
    if (cand_scores_.empty()) return out;
    const at::Tensor winners = Winners();  // ascending: grouped by layer, then head, then position
    int64_t from = 0;
    for (size_t l = 0; l < cand_scores_.size(); ++l) {
      const int64_t n = cand_scores_[l].numel();
      const at::Tensor mine = winners.masked_select((winners >= from) & (winners < from + n)) - from;
      out.push_back(SplitByRow(cand_flat_[l].index_select(0, mine), heads_, len_));
      from += n;
    }
    cand_scores_.clear();
    cand_flat_.clear();
    cand_layer_.clear();
    handed_.clear();
    narrowed_.clear();
    return out;
  }

  std::vector<std::pair<int64_t, HeadSelection>> TakeNarrowed() override { return std::exchange(narrowed_, {}); }

 private:
  // Indices (ascending) into the concatenation of every layer's candidates of the top total_
  // of them: TopKFlatSorted's order (score, then the earlier index). The candidates of each
  // layer are kept in (head, position) order and the layers in order, so an index into the
  // concatenation orders equal scores exactly as the flat index over every layer's full scores.
  // TopKFlatAscending, not a sort: at 128K the candidates are 7M entries, and a sort of their
  // keys with indices held several hundred MB at the peak of the prefill.
  at::Tensor Winners() const { return TopKFlatAscending(at::cat(cand_scores_), total_); }

  // The running global top-k, exact: once the layers so far hold more than total_ candidates,
  // a candidate outside their top total_ stays outside for good (a later layer only adds
  // entries, and its entries come later in the flat order, so they never win a tie against it).
  // Every layer's losers are dropped now. The last layer's candidates are returned (original
  // positions per head; nullopt when it lost none), so it is compacted to them at once; an
  // earlier layer is handed out again (TakeNarrowed) once it has lost a 64th of what it was last
  // compacted to. So the model holds about total_ entries besides the layer being prefilled,
  // not every layer's first candidates: at 128K and ratio 0.8 that is 3.4 GB, against about
  // 8 GB when only the last layer was narrowed.
  std::optional<HeadSelection> Prune() {
    int64_t count = 0;
    std::vector<int64_t> bounds{0};
    for (const auto& c : cand_scores_) bounds.push_back(count += c.numel());
    if (count <= total_) return std::nullopt;
    const at::Tensor winners = Winners();  // ascending
    // How many winners each layer has: one transfer of the layer boundaries' ranks.
    const at::Tensor cuts =
        at::searchsorted(winners, at::tensor(bounds, winners.options())).to(at::kCPU).contiguous();
    const int64_t* cut = cuts.data_ptr<int64_t>();
    std::optional<HeadSelection> last;
    const size_t layers = cand_scores_.size();
    for (size_t j = 0; j < layers; ++j) {
      const int64_t n = cut[j + 1] - cut[j];
      if (n == cand_scores_[j].numel()) continue;
      const at::Tensor mine = winners.narrow(0, cut[j], n) - bounds[j];
      cand_scores_[j] = cand_scores_[j].index_select(0, mine);
      cand_flat_[j] = cand_flat_[j].index_select(0, mine);
      if (j + 1 == layers) {
        last = SplitByRow(cand_flat_[j], heads_, len_);
        handed_[j] = n;
      } else if (n <= handed_[j] - std::max<int64_t>(1, handed_[j] / 64)) {
        narrowed_.emplace_back(cand_layer_[j], SplitByRow(cand_flat_[j], heads_, len_));
        handed_[j] = n;
      }
    }
    return last;
  }

  int64_t window_, kernel_;
  double tau_;
  bool across_layers_;
  // Layer-DefensiveKV, per layer so far: the scores of its candidates and their flat indices
  // head * len + position, ascending.
  std::vector<at::Tensor> cand_scores_, cand_flat_;
  std::vector<int64_t> cand_layer_;  // LayerInputs::layer of each
  std::vector<int64_t> handed_;      // how many candidates each layer was last compacted to
  std::vector<std::pair<int64_t, HeadSelection>> narrowed_;  // for TakeNarrowed
  int64_t total_ = 0, heads_ = 0, len_ = 0;
};

}  // namespace

std::unique_ptr<Press> MakeDefensiveKV(int64_t w, int64_t k, double tau, bool across_layers) {
  return std::make_unique<DefensiveKVPress>(w, k, tau, across_layers);
}

}  // namespace defkv::press
