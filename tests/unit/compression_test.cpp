// Compression through the Generator: exact memory accounting, ratio 0 is the full cache, and
// bad press requests are rejected with messages.
#include <cmath>

#include <gtest/gtest.h>

#include "core/engine/generator.h"
#include "core/press/press_info.h"

namespace defkv::engine {
namespace {

class Compression : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    EngineOptions o;
    o.model_dir = std::string(DEFKV_TINY_MODELS) + "/llama_gqa2";  // 2 layers, 2 kv heads, head_dim 16
    o.prefill_chunk = 37;  // several chunks: compression must wait for the last one
    auto g = Generator::Create(o);
    ASSERT_TRUE(g.ok()) << g.status();
    gen_ = g->release();
  }
  static void TearDownTestSuite() { delete gen_; }
  static GenerateRequest Request(const std::string& press, double ratio) {
    GenerateRequest r;
    r.context = "The secret code is 4721. Many other numbers follow: 18, 99, 3051, 77, 640. "
                "Remember the code and forget the rest of this long and rambling paragraph, please.";
    r.question = "What is the code?";
    r.max_new_tokens = 6;
    r.press = press;
    r.compression_ratio = ratio;
    return r;
  }
  static inline Generator* gen_ = nullptr;
};

TEST_F(Compression, EveryPressAccountsForExactlyWhatItKeeps) {
  for (const auto& info : press::ListPresses()) {
    if (info.name == "none") continue;
    GenerateRequest req = Request(info.name, 0.5);
    req.report_kept_positions = true;
    auto r = gen_->Generate(req);
    ASSERT_TRUE(r.ok()) << info.name << ": " << r.status();
    const Usage& u = r->usage;
    const auto& c = r->compression;
    EXPECT_EQ(c.press, info.name);
    ASSERT_EQ(c.kept.size(), 2u);
    int64_t kept = 0;
    for (size_t l = 0; l < 2; ++l) {
      ASSERT_EQ(c.kept[l].size(), 2u);
      for (size_t h = 0; h < 2; ++h) {
        kept += c.kept[l][h];
        EXPECT_EQ(static_cast<int64_t>(c.positions[l][h].size()), c.kept[l][h]);
      }
    }
    const int64_t entry_bytes = 2 * 16 * 4;  // K and V, head_dim 16, fp32
    EXPECT_EQ(u.kv_entries_before, u.context_tokens * 2 * 2) << info.name;
    EXPECT_EQ(u.kv_entries_after, kept) << info.name;
    EXPECT_EQ(u.kv_bytes_before, u.kv_entries_before * entry_bytes);
    EXPECT_EQ(u.kv_bytes_after, kept * entry_bytes) << info.name;
    EXPECT_LT(u.kv_entries_after, u.kv_entries_before) << info.name;
    // Question and generated tokens are never evicted: they come on top of the kept context.
    const int64_t fed = u.question_tokens + u.generated_tokens - (r->finish_reason == FinishReason::kEos ? 0 : 1);
    EXPECT_EQ(u.kv_entries, kept + fed * 2 * 2) << info.name;
    EXPECT_GT(c.scoring_seconds, 0) << info.name;
  }
}

TEST_F(Compression, RatioZeroIsTheFullCache) {
  auto full = gen_->Generate(Request("none", 0.0));
  ASSERT_TRUE(full.ok());
  for (const char* p : {"snapkv", "defensivekv", "layer_defensivekv", "knorm"}) {
    auto r = gen_->Generate(Request(p, 0.0));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->token_ids, full->token_ids) << p;
    EXPECT_EQ(r->usage.kv_entries_after, r->usage.kv_entries_before);
    EXPECT_EQ(r->timings.compression, 0);
  }
}

TEST_F(Compression, AliasesAreAccepted) {
  auto r = gen_->Generate(Request("efficient_layer_defensivekv", 0.8));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->compression.press, "layer_defensivekv");
}

TEST_F(Compression, BadRequestsSayWhatIsWrong) {
  auto expect_invalid = [](const GenerateRequest& req, const std::string& fragment) {
    auto r = gen_->Generate(req);
    ASSERT_FALSE(r.ok()) << fragment;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(fragment), std::string::npos) << r.status();
  };
  expect_invalid(Request("snapkv2", 0.5), "valid presses:");
  expect_invalid(Request("snapkv", -0.1), "compression_ratio must be in [0, 1)");
  expect_invalid(Request("snapkv", 1.0), "compression_ratio must be in [0, 1)");
  expect_invalid(Request("snapkv", std::nan("")), "compression_ratio must be in [0, 1)");
  GenerateRequest opt = Request("snapkv", 0.5);
  opt.press_options = {{"window", "8"}};
  expect_invalid(opt, "has no option \"window\"");
  opt.press_options = {{"window_size", "eight"}};
  expect_invalid(opt, "expects an int");
  GenerateRequest shorty = Request("snapkv", 0.5);
  shorty.context = "Tiny.";
  shorty.press_options = {{"window_size", "64"}};
  expect_invalid(shorty, "needs more than window_size=64");
}

}  // namespace
}  // namespace defkv::engine
