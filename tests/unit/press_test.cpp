// Presses against the oracles of spec/presses.md §11 and the worked example of §4.5, on real
// layer inputs from a prefill of a tiny random model.
#include <algorithm>
#include <limits>
#include <set>

#include <gtest/gtest.h>

#include "core/press/defensivekv.h"
#include "core/press/presses.h"
#include "core/press/registry.h"
#include "core/press/snapkv.h"

namespace defkv::press {
namespace {

// ---- spec §4.5: the toy example ----

at::Tensor ToyAttention() {
  // [H_q = 2, w = 2, n = 6], rows (h'0,j0), (h'0,j1), (h'1,j0), (h'1,j1).
  return at::tensor({.30, .05, .05, .10, .05, .05, .20, .02, .02, .02, .30, .04,  //
                     .40, .10, .00, .00, .00, .10, .10, .00, .50, .00, .00, .00},
                    at::kFloat)
      .view({2, 2, 6});
}

TEST(Selection, EqualScoresRankByEarlierPosition) {
  // 1 > 0.5 > the zeros (-0 equals +0; positions 0, 2, 3, 6 in that order) > -1 > -2.
  const at::Tensor s = at::tensor({0.f, 1.f, 0.f, -0.f, 0.5f, -2.f, 0.f, -1.f});
  const std::vector<int64_t> order = {1, 4, 0, 2, 3, 6, 7, 5};
  const at::Tensor sorted = SortDescendingIndices(s);
  EXPECT_EQ(std::vector<int64_t>(sorted.data_ptr<int64_t>(), sorted.data_ptr<int64_t>() + 8), order);
  const at::Tensor top = TopKIndices(s.view({1, 8}), 4);
  EXPECT_EQ(std::vector<int64_t>(top.data_ptr<int64_t>(), top.data_ptr<int64_t>() + 4),
            std::vector<int64_t>(order.begin(), order.begin() + 4));
  // Rows of many ties against a sort by score descending, then position ascending, in plain C++.
  at::manual_seed(7);
  for (int64_t len : {5, 300, 70000}) {
    const at::Tensor x = (at::randint(0, 4, {3, len}).to(at::kFloat) - 1.5) * 0.25;
    const int64_t k = len / 3 + 1;
    const at::Tensor got = TopKIndices(x, k).contiguous();
    for (int64_t r = 0; r < 3; ++r) {
      const at::Tensor row = x[r].contiguous();
      const float* v = row.data_ptr<float>();
      std::vector<int64_t> want(len);
      for (int64_t i = 0; i < len; ++i) want[i] = i;
      std::sort(want.begin(), want.end(), [&](int64_t a, int64_t b) { return v[a] != v[b] ? v[a] > v[b] : a < b; });
      want.resize(k);
      const int64_t* g = got[r].data_ptr<int64_t>();
      EXPECT_EQ(std::vector<int64_t>(g, g + k), want) << "len " << len << " row " << r;
    }
  }
}

// TopKFlatAscending finds by bisection what TopKFlatSorted finds by a sort: the same indices,
// with ties (and -0 against +0) ranked by the earlier index, for any n from none to all.
TEST(Selection, TopKByThresholdEqualsTopKBySort) {
  at::manual_seed(9);
  const at::Tensor s = at::tensor({0.f, 1.f, 0.f, -0.f, 0.5f, -2.f, 0.f, -1.f});
  for (int64_t n = 0; n <= 9; ++n)
    EXPECT_TRUE(TopKFlatAscending(s, n).equal(TopKFlatSorted(s, std::min<int64_t>(n, 8)))) << "n " << n;
  for (int64_t len : {1, 2, 300, 70001}) {
    // Many ties, negative and positive values, and the largest and smallest floats.
    at::Tensor x = (at::randint(0, 6, {len}).to(at::kFloat) - 2.5) * 0.5;
    if (len > 2) {
      x[0] = std::numeric_limits<float>::max();
      x[1] = std::numeric_limits<float>::lowest();
    }
    for (int64_t n : {int64_t{1}, len / 3 + 1, len - 1, len}) {
      if (n < 1) continue;
      const at::Tensor got = TopKFlatAscending(x, n), want = TopKFlatSorted(x, n);
      EXPECT_TRUE(got.equal(want)) << "len " << len << " n " << n;
    }
  }
}

TEST(DefensiveKV, WorkedExampleAggregation) {
  at::Tensor m, mu;
  at::Tensor s = defensive::DefensiveAggregate(ToyAttention(), /*num_kv_heads=*/1, /*kernel_size=*/5, &m, &mu);
  auto expect = [](const at::Tensor& got, std::vector<float> want) {
    at::Tensor w = at::tensor(want, at::kFloat).view_as(got);
    EXPECT_LT((got - w).abs().max().item<double>(), 1e-5) << got;
  };
  expect(m, {.15789f, .15789f, .15789f, .10909f, .10714f, .09818f});
  expect(mu, {.13135f});
  expect(s, {.15789f, .15789f, .15789f, .13135f, .13135f, .13135f});
}

TEST(DefensiveKV, WorkedExampleStageOne) {
  at::Tensor abar = ToyAttention().mean(1).mean(0, true);  // [1, 6]
  HeadSelection prot = defensive::StageOneProtected(abar, /*tau=*/0.9, /*beta=*/0.0, /*cap=*/100);
  at::Tensor got = std::get<0>(prot[0].sort());
  EXPECT_TRUE(got.equal(at::tensor({0, 2, 4, 5}, at::kLong))) << got;
  // The cap bounds the set, and a negative cap protects nothing (clamped, documented).
  EXPECT_EQ(defensive::StageOneProtected(abar, 0.9, 0.0, 2)[0].numel(), 2);
  EXPECT_EQ(defensive::StageOneProtected(abar, 0.9, 0.0, -3)[0].numel(), 0);
}

TEST(DefensiveKV, AggregationOracles) {
  at::manual_seed(5);
  at::Tensor a = at::softmax(at::randn({8, 4, 40}), -1) * 0.7;  // rows with 0.7 mass, G = 4
  at::Tensor m, mu;
  at::Tensor s = defensive::DefensiveAggregate(a, 2, 5, &m, &mu);
  // (14) S >= mu, S == M where M >= mu, some token sits at the prior.
  EXPECT_TRUE((s >= mu.unsqueeze(1) - 1e-7).all().item<bool>());
  EXPECT_TRUE(at::where(m >= mu.unsqueeze(1), s == m, at::ones_like(m, at::kBool)).all().item<bool>());
  EXPECT_TRUE((s == mu.unsqueeze(1)).any(1).all().item<bool>());
  // (15) M >= SnapKV-style mean of the same pooled rows.
  at::Tensor pooled = AvgPool(a, 5);
  pooled = pooled * a.sum(-1, true) / pooled.sum(-1, true);
  at::Tensor mean_agg = pooled.view({2, 16, 40}).mean(1);
  EXPECT_TRUE((m >= mean_agg - 1e-7).all().item<bool>());
  // (16) renormalised pooling keeps each row's mass.
  EXPECT_LT((pooled.sum(-1) - a.sum(-1)).abs().max().item<double>(), 1e-6);
}

// ---- real layer inputs from a tiny model ----

class Capture : public model::LayerHook {
 public:
  explicit Capture(int64_t layers) : hidden(layers) {}
  void AfterAttention(int64_t layer, const at::Tensor& x) override { hidden[layer] = x.clone(); }
  std::vector<at::Tensor> hidden;
};

struct Prefill {
  std::unique_ptr<model::Transformer> model;
  std::unique_ptr<cache::HeadwiseCache> cache;
  std::vector<at::Tensor> hidden;

  LayerInputs Inputs(int64_t layer, double ratio) const {
    LayerInputs in;
    in.layer = layer;
    in.model = model.get();
    in.keys = cache->keys(layer);
    in.values = cache->values(layer);
    in.hidden = hidden[layer];
    in.compression_ratio = ratio;
    return in;
  }
};

Prefill PrefillModel(const std::string& family, int64_t len, uint64_t seed = 0) {
  Prefill p;
  auto m = model::Transformer::Load(std::string(DEFKV_TINY_MODELS) + "/" + family, {});
  EXPECT_TRUE(m.ok()) << m.status();
  p.model = std::move(*m);
  p.cache = p.model->NewCache();
  p.cache->Reserve(len);
  Capture cap(p.model->config().num_layers);
  at::manual_seed(seed);
  at::InferenceMode guard;
  p.model->Forward(at::randint(3, 320, {len}, at::kLong), at::arange(len, at::kLong), *p.cache, false, &cap);
  p.hidden = cap.hidden;
  return p;
}

std::unique_ptr<Press> Make(const std::string& name, std::map<std::string, std::string> opts = {}) {
  auto p = MakePress(name, opts);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

std::set<int64_t> AsSet(const at::Tensor& t) {
  std::set<int64_t> s;
  at::Tensor c = t.to(at::kLong).contiguous();
  for (int64_t i = 0; i < c.numel(); ++i) s.insert(c.data_ptr<int64_t>()[i]);
  return s;
}

class PressOnModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { p_ = new Prefill(PrefillModel("mistral", 100)); }  // GQA 4:1, 2 kv heads
  static void TearDownTestSuite() { delete p_; }
  static inline Prefill* p_ = nullptr;
};

TEST_F(PressOnModel, UniformPressesKeepTheirTopScoresInEveryHead) {
  at::InferenceMode guard;
  for (const char* name : {"snapkv", "knorm", "keydiff", "tova", "observed_attention", "expected_attention", "random"}) {
    auto press = Make(name, {});
    auto* scorer = dynamic_cast<ScorerPress*>(press.get());
    ASSERT_NE(scorer, nullptr) << name;
    for (double ratio : {0.25, 0.5, 0.8}) {
      LayerInputs in = p_->Inputs(1, ratio);
      at::Tensor s = scorer->Score(in);
      ASSERT_EQ(s.sizes(), (at::IntArrayRef{2, 100})) << name;
      auto sel = *press->CompressLayer(in);
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t n = NKept(100, ratio);  // 75, 50, 19 (int(100 * 0.19999999999999996))
        ASSERT_EQ(sel[h].numel(), n) << name << " ratio " << ratio;
        // (3) the kept scores are the top of the sorted scores (values, so ties do not matter).
        at::Tensor kept = std::get<0>(s[h].index_select(0, sel[h]).sort(0, true));
        at::Tensor top = std::get<0>(s[h].sort(0, true)).narrow(0, 0, n);
        EXPECT_TRUE(kept.equal(top)) << name;
      }
    }
  }
  EXPECT_EQ(NKept(100, 0.8), 19);
  EXPECT_EQ(NKept(4096, 0.8), 819);
  EXPECT_EQ(NKept(4096, 0.9), 409);
  EXPECT_EQ(NKept(3, 0.9), 1);  // kvpress never empties a head
}

TEST_F(PressOnModel, StreamingLLMKeepsSinksAndRecentTokens) {
  auto sel = *Make("streaming_llm")->CompressLayer(p_->Inputs(0, 0.5));
  std::set<int64_t> want = {0, 1, 2, 3};
  for (int64_t t = 54; t < 100; ++t) want.insert(t);
  for (const auto& h : sel) EXPECT_EQ(AsSet(h), want);  // (7)
}

TEST_F(PressOnModel, WindowAndSinkTokensAreKept) {
  for (const char* name : {"snapkv", "adakv", "defensivekv"}) {  // (8)
    auto sel = *Make(name, {{"window_size", "16"}})->CompressLayer(p_->Inputs(1, 0.8));
    for (const auto& h : sel) {
      auto s = AsSet(h);
      for (int64_t t = 84; t < 100; ++t) EXPECT_TRUE(s.count(t)) << name << " evicted window token " << t;
    }
  }
  auto ea = *Make("expected_attention")->CompressLayer(p_->Inputs(0, 0.8));
  for (const auto& h : ea)
    for (int64_t t = 0; t < 4; ++t) EXPECT_TRUE(AsSet(h).count(t));
  auto tova = *Make("tova")->CompressLayer(p_->Inputs(0, 0.8));
  EXPECT_EQ(AsSet(tova[0]), AsSet(tova[1]));  // same set in every kv head
  EXPECT_TRUE(AsSet(tova[0]).count(99));
}

TEST_F(PressOnModel, KnormKeepsTheSmallestKeys) {
  LayerInputs in = p_->Inputs(0, 0.5);
  auto sel = *Make("knorm")->CompressLayer(in);
  for (int64_t h = 0; h < 2; ++h) {
    at::Tensor norms = at::linalg_vector_norm(in.keys[h], 2, {-1});
    EXPECT_EQ(AsSet(sel[h]), AsSet(std::get<1>(norms.topk(50, -1, /*largest=*/false))));  // (9)
  }
}

TEST_F(PressOnModel, AdaKVBudgets) {
  LayerInputs in = p_->Inputs(1, 0.8);
  auto sel = *Make("adakv", {{"window_size", "16"}})->CompressLayer(in);
  const int64_t n_kept = NKept(100, 0.8), n_safe = std::max<int64_t>(1, static_cast<int64_t>(n_kept * 0.2));
  EXPECT_EQ(sel[0].numel() + sel[1].numel(), 2 * n_kept);  // (11)
  for (const auto& h : sel) EXPECT_GE(h.numel(), n_safe);
  // alpha = 1 secures a full uniform budget per head: the same sets as SnapKV.
  auto ada1 = *Make("adakv", {{"window_size", "16"}, {"alpha_safeguard", "1"}})->CompressLayer(in);
  auto snap = *Make("snapkv", {{"window_size", "16"}})->CompressLayer(in);
  for (int64_t h = 0; h < 2; ++h) EXPECT_EQ(AsSet(ada1[h]), AsSet(snap[h]));
}

TEST_F(PressOnModel, CriticalAdaKVUsesAdaKVBudgets) {
  LayerInputs in = p_->Inputs(0, 0.5);
  auto crit = *Make("critical_adakv", {{"window_size", "16"}})->CompressLayer(in);
  auto ada = *Make("adakv", {{"window_size", "16"}})->CompressLayer(in);
  for (int64_t h = 0; h < 2; ++h) EXPECT_EQ(crit[h].numel(), ada[h].numel()) << "head " << h;  // (13)
}

TEST_F(PressOnModel, CriticalKVFirstStageIsKept) {
  LayerInputs in = p_->Inputs(1, 0.5);
  auto snap = std::make_unique<SnapKVPress>(16, 5);
  at::Tensor base = snap->Score(in);
  auto sel = *Make("criticalkv", {{"window_size", "16"}})->CompressLayer(in);
  const int64_t first = static_cast<int64_t>(0.5 * 100 * 0.5);
  for (int64_t h = 0; h < 2; ++h) {
    EXPECT_EQ(sel[h].numel(), 50);
    auto kept = AsSet(sel[h]);
    at::Tensor top = std::get<1>(base[h].topk(first));
    for (int64_t i = 0; i < first; ++i) EXPECT_TRUE(kept.count(top[i].item<int64_t>()));  // (12)
  }
}

TEST_F(PressOnModel, PyramidBudgetsShrinkWithDepth) {
  auto budget = [](int64_t len, double r, int64_t layer) { return PyramidKVPress::LayerBudget(len, r, 64, 20, layer, 32); };
  EXPECT_GT(budget(8192, 0.5, 0), budget(8192, 0.5, 31));
  double sum = 0;
  for (int l = 0; l < 32; ++l) {
    if (l > 0) EXPECT_LE(budget(8192, 0.5, l), budget(8192, 0.5, l - 1));
    sum += static_cast<double>(budget(8192, 0.5, l));
  }
  EXPECT_NEAR(sum / 32, 8192 * 0.5, 2.0);  // (10)
  // When the smallest layer would hold less than the window, every layer gets round(L(1 - r)).
  for (int l = 0; l < 32; ++l) EXPECT_EQ(budget(4096, 0.8, l), 819);
  // The real selection honours the per-layer budget (tiny model: fallback budgets).
  auto sel = *Make("pyramidkv", {{"window_size", "16"}})->CompressLayer(p_->Inputs(1, 0.5));
  for (const auto& h : sel) EXPECT_EQ(h.numel(), PyramidKVPress::LayerBudget(100, 0.5, 16, 20, 1, 2));
}

TEST_F(PressOnModel, DefensiveKVLayerBudgetAndProtection) {
  for (double ratio : {0.5, 0.8}) {
    auto sel = *Make("defensivekv", {{"window_size", "16"}})->CompressLayer(p_->Inputs(1, ratio));
    const auto want = static_cast<int64_t>(100.0 * (1.0 - ratio) * 2.0);  // (18): int(L(1-cr)H)
    EXPECT_EQ(sel[0].numel() + sel[1].numel(), want);
  }
}

TEST(LayerDefensiveKV, OneBudgetAcrossLayers) {
  Prefill p = PrefillModel("llama_gqa2", 120, 3);
  auto press = Make("layer_defensivekv", {{"window_size", "16"}});
  // Each layer's candidates (what it is compacted to at once): a superset of what it keeps.
  std::vector<std::optional<HeadSelection>> candidates;
  std::vector<std::vector<std::pair<int64_t, HeadSelection>>> narrowed;
  for (int64_t l = 0; l < 2; ++l) {
    candidates.push_back(press->CompressLayer(p.Inputs(l, 0.8)));
    narrowed.push_back(press->TakeNarrowed());
  }
  EXPECT_TRUE(press->narrows_layers());
  EXPECT_TRUE(press->TakeNarrowed().empty()) << "taking them empties the list";
  auto all = press->Finish();
  ASSERT_EQ(all.size(), 2u);
  int64_t total = 0;
  for (const auto& layer : all)
    for (const auto& h : layer) total += h.numel();
  EXPECT_EQ(total, static_cast<int64_t>(120.0 * (1.0 - 0.8) * 2.0 * 2.0));  // (22)
  // Exactly the global top entries over both layers' full scores (ties: the earlier flat
  // index), though each layer was narrowed to candidates on the way.
  std::vector<at::Tensor> scores;
  for (int64_t l = 0; l < 2; ++l) scores.push_back(defensive::LayerScores(p.Inputs(l, 0.8), 16, 5, 0.9));
  const HeadSelection global = SplitByRow(TopKFlatSorted(at::stack(scores).reshape({-1}), total), 4, scores[0].size(1));
  for (int64_t l = 0; l < 2; ++l) {
    for (int64_t h = 0; h < 2; ++h) {
      const at::Tensor kept = std::get<0>(all[l][h].sort());
      EXPECT_TRUE(kept.equal(global[l * 2 + h])) << "layer " << l << " head " << h;
      if (candidates[l]) {
        const at::Tensor cand = (*candidates[l])[h];
        EXPECT_TRUE(at::isin(kept, cand).all().item<bool>()) << "layer " << l << " keeps an entry it was narrowed away from";
        EXPECT_GE(cand.numel(), kept.numel());
      }
    }
  }
  // With 240 entries a layer and 96 kept in all, the first layer is narrowed to its own top 96
  // at once, and the second to its entries among the top 96 of both.
  ASSERT_TRUE(candidates[0].has_value());
  EXPECT_EQ((*candidates[0])[0].numel() + (*candidates[0])[1].numel(), total);
  ASSERT_TRUE(candidates[1].has_value());
  EXPECT_EQ((*candidates[1])[0].numel() + (*candidates[1])[1].numel(),
            all[1][0].numel() + all[1][1].numel());
  // Scoring the second layer narrows the first again, to its share of the top 96 of both:
  // exactly what it keeps in the end, as every candidate now wins.
  EXPECT_TRUE(narrowed[0].empty());
  const int64_t first_keeps = all[0][0].numel() + all[0][1].numel();
  ASSERT_LT(first_keeps, total) << "the second layer should win some entries with this seed";
  ASSERT_EQ(narrowed[1].size(), 1u);
  EXPECT_EQ(narrowed[1][0].first, 0);
  for (int64_t h = 0; h < 2; ++h) EXPECT_TRUE(narrowed[1][0].second[h].equal(std::get<0>(all[0][h].sort())));
  // Each layer's set is that layer's own top entries.
  for (int64_t l = 0; l < 2; ++l) {
    const at::Tensor& sl = scores[l];
    int64_t n = 0;
    for (const auto& h : all[l]) n += h.numel();
    at::Tensor kept_vals = at::cat({sl[0].index_select(0, all[l][0]), sl[1].index_select(0, all[l][1])});
    at::Tensor top = std::get<0>(sl.reshape({-1}).sort(0, true)).narrow(0, 0, n);
    EXPECT_TRUE(std::get<0>(kept_vals.sort(0, true)).equal(top));
  }
}

TEST(Registry, NamesAliasesAndOptions) {
  EXPECT_EQ((*FindPress("efficient_defensivekv"))->name, "defensivekv");
  EXPECT_EQ((*FindPress("criti_adasnapkv"))->name, "critical_adakv");
  EXPECT_EQ((*FindPress("ada_snapkv"))->name, "adakv");
  auto unknown = MakePress("magic", {});
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("valid presses: none, snapkv"), std::string::npos);
  auto bad_opt = MakePress("snapkv", {{"windw", "3"}});
  ASSERT_FALSE(bad_opt.ok());
  EXPECT_NE(bad_opt.status().message().find("window_size"), std::string::npos);
  auto bad_type = MakePress("snapkv", {{"window_size", "abc"}});
  ASSERT_FALSE(bad_type.ok());
  EXPECT_NE(bad_type.status().message().find("expects an int"), std::string::npos);
  EXPECT_FALSE(MakePress("snapkv", {{"kernel_size", "4"}}).ok());
  EXPECT_FALSE(MakePress("defensivekv", {{"tau", "1.5"}}).ok());
  EXPECT_FALSE(MakePress("knorm", {{"window_size", "3"}}).ok());
  for (double r : {-0.1, 1.0, 1.5, std::nan("")}) EXPECT_FALSE(CheckRatio(r).ok()) << r;
  for (double r : {0.0, 0.5, 0.99}) EXPECT_TRUE(CheckRatio(r).ok()) << r;
  EXPECT_EQ(*MakePress("none", {}), nullptr);
}

}  // namespace
}  // namespace defkv::press
