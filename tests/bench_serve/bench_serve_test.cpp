// defkv-bench-serve's workload, statistics and report, without a server: distributions and mixes
// as parsed from the command line, the arrival schedule's moments, and the report of hand-made
// request records whose every number can be worked out by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <numeric>
#include <set>

#include "client/bench_serve/report.h"
#include "client/bench_serve/stats.h"
#include "client/bench_serve/workload.h"

namespace bs = defkv::bench_serve;

TEST(Percentile, InterpolatesLikeNumpy) {
  const std::vector<double> v = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(bs::Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(bs::Percentile(v, 50), 2.5);
  EXPECT_DOUBLE_EQ(bs::Percentile(v, 99), 3.97);  // numpy.percentile([1,2,3,4], 99)
  EXPECT_DOUBLE_EQ(bs::Percentile(v, 100), 4);
  EXPECT_DOUBLE_EQ(bs::Percentile({7}, 95), 7);
}

TEST(Summarize, OrdersAndEmpty) {
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) v.push_back(i);  // unsorted on purpose
  const bs::Summary s = bs::Summarize(v);
  EXPECT_EQ(s.count, 100u);
  EXPECT_DOUBLE_EQ(s.mean, 50.5);
  EXPECT_DOUBLE_EQ(s.p50, 50.5);
  EXPECT_DOUBLE_EQ(s.p99, 99.01);
  EXPECT_DOUBLE_EQ(s.max, 100);
  EXPECT_LE(s.p50, s.p90);
  EXPECT_LE(s.p95, s.p99);
  const bs::Summary none = bs::Summarize({});
  EXPECT_EQ(none.count, 0u);
  EXPECT_TRUE(std::isnan(none.mean) && std::isnan(none.p99));
}

TEST(IntDistribution, ParsesTheThreeForms) {
  std::mt19937_64 rng(1);
  auto fixed = bs::IntDistribution::Parse("32768");
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  EXPECT_EQ(fixed->Sample(rng), 32768);
  EXPECT_EQ(fixed->Min(), 32768);
  EXPECT_DOUBLE_EQ(fixed->Mean(), 32768);

  auto list = bs::IntDistribution::Parse("4096=3,16384=1");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->Min(), 4096);
  EXPECT_EQ(list->Max(), 16384);
  EXPECT_DOUBLE_EQ(list->Mean(), (3 * 4096 + 16384) / 4.0);
  std::map<int64_t, int> counts;
  for (int i = 0; i < 20000; ++i) ++counts[list->Sample(rng)];
  ASSERT_EQ(counts.size(), 2u);
  EXPECT_NEAR(counts[4096] / 20000.0, 0.75, 0.02);

  auto uniform = bs::IntDistribution::Parse("uniform:10:13");
  ASSERT_TRUE(uniform.ok()) << uniform.status();
  EXPECT_DOUBLE_EQ(uniform->Mean(), 11.5);
  counts.clear();
  for (int i = 0; i < 4000; ++i) ++counts[uniform->Sample(rng)];
  EXPECT_EQ(counts.size(), 4u) << "both ends included";
  EXPECT_EQ(counts.begin()->first, 10);
  EXPECT_EQ(counts.rbegin()->first, 13);
  EXPECT_EQ(uniform->spec(), "uniform:10:13");
}

TEST(IntDistribution, RefusesMalformedSpecs) {
  for (const char* bad : {"", "0", "-5", "1.5", "abc", "1,,2", "4096=0", "4096=x", "uniform:5:3", "uniform:1",
                          "uniform:0:4", "uniform:a:b", "uniform:1:2:3"})
    EXPECT_FALSE(bs::IntDistribution::Parse(bad).ok()) << "'" << bad << "'";
}

TEST(Mix, DefaultsLabelsAndErrors) {
  auto mix = bs::ParseMix("snapkv:0.8=3,none=1,knorm:0.25");
  ASSERT_TRUE(mix.ok()) << mix.status();
  ASSERT_EQ(mix->size(), 3u);
  EXPECT_EQ((*mix)[0].press, "snapkv");
  EXPECT_DOUBLE_EQ((*mix)[0].ratio, 0.8);
  EXPECT_DOUBLE_EQ((*mix)[0].weight, 3);
  EXPECT_EQ((*mix)[0].Label(), "snapkv:0.8");
  EXPECT_DOUBLE_EQ((*mix)[1].ratio, 0);
  EXPECT_EQ((*mix)[1].Label(), "none:0");
  EXPECT_DOUBLE_EQ((*mix)[2].weight, 1);
  for (const char* bad : {"", "snapkv:1", "snapkv:-0.1", "snapkv:x", "snapkv=0", "snapkv=-1", ":0.5", "=2",
                          "snapkv:0.5,snapkv:0.5=2", "a,,b"})
    EXPECT_FALSE(bs::ParseMix(bad).ok()) << "'" << bad << "'";
  EXPECT_TRUE(bs::ParseMix("snapkv:0.5,snapkv:0.8").ok()) << "same press, two ratios";
}

TEST(Workload, RequestsAreAFunctionOfSeedAndIndex) {
  bs::Workload w{*bs::ParseMix("snapkv:0.8=3,none=1"), *bs::IntDistribution::Parse("uniform:100:200"),
                 *bs::IntDistribution::Parse("16,32")};
  int snapkv = 0;
  std::set<uint64_t> seeds;
  for (int64_t i = 0; i < 8000; ++i) {
    const bs::RequestSpec a = bs::MakeSpec(w, 42, i), b = bs::MakeSpec(w, 42, i);
    EXPECT_EQ(a.group, b.group);
    EXPECT_EQ(a.context_tokens, b.context_tokens);
    EXPECT_EQ(a.max_new_tokens, b.max_new_tokens);
    EXPECT_EQ(a.seed, b.seed);
    ASSERT_GE(a.context_tokens, 100);
    ASSERT_LE(a.context_tokens, 200);
    ASSERT_TRUE(a.max_new_tokens == 16 || a.max_new_tokens == 32);
    snapkv += a.group == 0;
    seeds.insert(a.seed);
  }
  EXPECT_NEAR(snapkv / 8000.0, 0.75, 0.02);
  EXPECT_EQ(seeds.size(), 8000u);
  EXPECT_NE(bs::MakeSpec(w, 42, 0).seed, bs::MakeSpec(w, 43, 0).seed);
}

// Gamma gaps with shape k and mean 1/rate have a coefficient of variation 1/sqrt(k).
TEST(ArrivalSchedule, MeanRateAndBurstiness) {
  for (double shape : {1.0, 4.0, 0.25}) {
    bs::ArrivalSchedule a(5.0, shape, 7), b(5.0, shape, 7);
    std::vector<double> gaps;
    double prev = 0;
    for (int i = 0; i < 50000; ++i) {
      const double t = a.Next();
      ASSERT_EQ(t, b.Next()) << "deterministic in the seed";
      ASSERT_GE(t, prev);
      gaps.push_back(t - prev);
      prev = t;
    }
    const double mean = std::accumulate(gaps.begin(), gaps.end(), 0.0) / gaps.size();
    double var = 0;
    for (double g : gaps) var += (g - mean) * (g - mean);
    const double cv = std::sqrt(var / gaps.size()) / mean;
    EXPECT_NEAR(mean, 0.2, 0.2 * 0.03) << "shape " << shape;
    EXPECT_NEAR(cv, 1 / std::sqrt(shape), 0.05 / std::sqrt(shape)) << "shape " << shape;
  }
  EXPECT_NE(bs::ArrivalSchedule(5, 1, 1).Next(), bs::ArrivalSchedule(5, 1, 2).Next());
}

TEST(SyntheticText, ExactLengthDeterministicDistinct) {
  for (size_t n : {0, 1, 17, 4096, 100000}) {
    const std::string t = bs::SyntheticText(3, n);
    EXPECT_EQ(t.size(), n);
    for (unsigned char ch : t) ASSERT_TRUE(ch >= 0x20 && ch < 0x7f);
  }
  EXPECT_EQ(bs::SyntheticText(3, 5000), bs::SyntheticText(3, 5000));
  const std::string a = bs::SyntheticText(3, 5000), b = bs::SyntheticText(4, 5000);
  size_t common = 0;
  while (common < a.size() && a[common] == b[common]) ++common;
  EXPECT_LT(common, 40u) << "two seeds share a long prefix";
  EXPECT_EQ(bs::SyntheticText(3, 100), a.substr(0, 100)) << "a shorter text is a prefix of a longer one";
}

TEST(TokenEstimate, FitsRateAndOverhead) {
  // 4 characters per token and 12 tokens of template: 1000 chars -> 262, 2000 -> 512.
  auto e = bs::FitTokens(1000, 262, 2000, 512);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_DOUBLE_EQ(e->chars_per_token, 4.0);
  EXPECT_DOUBLE_EQ(e->overhead_tokens, 12.0);
  EXPECT_EQ(e->Chars(1012), 4000u);
  EXPECT_EQ(e->Chars(5), 0u) << "never negative";
  EXPECT_FALSE(bs::FitTokens(1000, 300, 2000, 300).ok());
  EXPECT_FALSE(bs::FitTokens(2000, 300, 1000, 100).ok());
}

namespace {

bs::RequestRecord Ok(size_t group, double start, std::vector<bs::Delta> deltas, double end, int64_t out) {
  bs::RequestRecord r;
  r.group = group, r.start = start, r.end = end, r.deltas = std::move(deltas);
  r.context_tokens = 100, r.question_tokens = 10, r.output_tokens = out, r.target_context_tokens = 96;
  r.server_queue = 0.5, r.server_total = 1.5;
  return r;
}

}  // namespace

// Two groups; four requests, one failed. Every expected number is worked out from these records.
TEST(Aggregate, HandMadeRun) {
  const auto mix = *bs::ParseMix("snapkv:0.8=3,none=1");
  std::vector<bs::RequestRecord> records;
  // snapkv: TTFT 1.0, then a delta of 1 id after 0.2 s and one of 2 ids after 0.4 s (0.2 s each).
  records.push_back(Ok(0, 0.0, {{1.0, 1}, {1.2, 1}, {1.6, 2}}, 1.7, 4));
  // snapkv: TTFT 0.5, one more id after 0.1 s.
  records.push_back(Ok(0, 1.0, {{1.5, 1}, {1.6, 1}}, 2.0, 2));
  // none: a single delta, so a TTFT but no ITL and no TPOT.
  records.push_back(Ok(1, 0.0, {{0.3, 1}}, 0.5, 1));
  bs::RequestRecord failed;
  failed.group = 1, failed.start = 2.0, failed.end = 4.0, failed.error_code = "RESOURCE_EXHAUSTED";
  failed.error = "queue full", failed.target_context_tokens = 96;
  records.push_back(failed);
  bs::RequestRecord failed2 = failed;
  failed2.start = 2.5, failed2.end = 3.0, failed2.error = "second";
  records.push_back(failed2);

  const bs::Report r = bs::Aggregate(records, mix);
  EXPECT_EQ(r.sent, 5u);
  EXPECT_EQ(r.completed, 3u);
  EXPECT_EQ(r.failed, 2u);
  EXPECT_DOUBLE_EQ(r.duration_s, 4.0);
  EXPECT_DOUBLE_EQ(r.requests_per_s, 0.75);
  EXPECT_EQ(r.output_tokens, 7);
  EXPECT_DOUBLE_EQ(r.output_tokens_per_s, 7 / 4.0);
  EXPECT_EQ(r.input_tokens, 330);
  EXPECT_DOUBLE_EQ(r.mean_context_tokens, 100);
  EXPECT_DOUBLE_EQ(r.mean_target_context_tokens, 96);
  // Busy time 1.7 + 1.0 + 0.5 + 2.0 + 0.5 = 5.7 over 4 s; at most 2 overlap.
  EXPECT_DOUBLE_EQ(r.mean_in_flight, 5.7 / 4);
  EXPECT_EQ(r.max_in_flight, 2);
  EXPECT_DOUBLE_EQ(r.mean_in_engine, 3 * 1.0 / 4);
  // The last send is at 2.5 s; all 7 ids arrived before it.
  EXPECT_DOUBLE_EQ(r.sending_s, 2.5);
  EXPECT_DOUBLE_EQ(r.output_tokens_per_s_while_sending, 7 / 2.5);
  EXPECT_TRUE(std::isnan(r.max_send_lag_s)) << "closed loop";

  EXPECT_EQ(r.latency.ttft.count, 3u);
  EXPECT_NEAR(r.latency.ttft.p50, 0.5, 1e-12);
  // ITL samples: 0.2 (one id), 0.2 twice (two ids over 0.4 s), 0.1.
  EXPECT_EQ(r.latency.itl.count, 4u);
  EXPECT_NEAR(r.latency.itl.mean, 0.7 / 4, 1e-12);
  EXPECT_NEAR(r.latency.itl.max, 0.2, 1e-12);
  // TPOT: 0.6 s / 3 ids, 0.1 s / 1 id.
  EXPECT_EQ(r.latency.tpot.count, 2u);
  EXPECT_NEAR(r.latency.tpot.mean, 0.15, 1e-12);
  EXPECT_NEAR(r.latency.e2e.max, 1.7, 1e-12);
  EXPECT_NEAR(r.latency.queue.mean, 0.5, 1e-12);

  ASSERT_EQ(r.groups.size(), 2u);
  EXPECT_EQ(r.groups[0].label, "snapkv:0.8");
  EXPECT_DOUBLE_EQ(r.groups[0].share, 0.75);
  EXPECT_EQ(r.groups[0].completed, 2u);
  EXPECT_EQ(r.groups[0].output_tokens, 6);
  EXPECT_DOUBLE_EQ(r.groups[0].output_tokens_per_s, 1.5);
  EXPECT_EQ(r.groups[0].latency.itl.count, 4u);
  EXPECT_EQ(r.groups[1].sent, 3u);
  EXPECT_EQ(r.groups[1].failed, 2u);
  EXPECT_EQ(r.groups[1].latency.itl.count, 0u);

  ASSERT_EQ(r.errors.size(), 1u);
  EXPECT_EQ(r.errors.at("RESOURCE_EXHAUSTED").count, 2u);
  EXPECT_EQ(r.errors.at("RESOURCE_EXHAUSTED").example, "queue full") << "the first message is kept";

  const auto j = bs::ToJson(r);
  EXPECT_EQ(j["totals"]["completed"], 3);
  EXPECT_TRUE(j["totals"]["max_send_lag_s"].is_null());
  EXPECT_NEAR(j["latency"]["ttft_ms"]["p50"].get<double>(), 500, 1e-9);
  EXPECT_TRUE(j["groups"][1]["latency"]["itl_ms"]["p50"].is_null());
  EXPECT_EQ(j["errors"]["RESOURCE_EXHAUSTED"]["count"], 2);
  const std::string text = bs::TextReport(r, "title");
  EXPECT_NE(text.find("snapkv:0.8"), std::string::npos);
  EXPECT_NE(text.find("RESOURCE_EXHAUSTED"), std::string::npos);
}

TEST(Aggregate, OpenLoopLagAndEmptyRun) {
  const auto mix = *bs::ParseMix("none");
  auto r1 = Ok(0, 1.25, {{1.5, 1}}, 2.0, 1);
  r1.scheduled = 1.0;
  auto r2 = Ok(0, 2.0, {{2.5, 1}}, 3.0, 1);
  r2.scheduled = 2.0;
  const bs::Report r = bs::Aggregate({r1, r2}, mix);
  EXPECT_DOUBLE_EQ(r.max_send_lag_s, 0.25);
  EXPECT_EQ(r.max_in_flight, 1) << "an end at a start frees its slot first";

  const bs::Report empty = bs::Aggregate({}, mix);
  EXPECT_EQ(empty.sent, 0u);
  EXPECT_TRUE(std::isnan(empty.requests_per_s));
  EXPECT_TRUE(std::isnan(empty.output_tokens_per_s_while_sending));
  EXPECT_TRUE(bs::ToJson(empty)["totals"]["requests_per_s"].is_null());
}
