// The Generator end to end on stories260K (a real trained model, shared/testdata): greedy
// output equals golden.json token for token; sampling, stop strings, streaming, cancellation.
#include <algorithm>
#include <fstream>
#include <memory>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/engine/generator.h"
#include "tests/unit/testdata.h"

namespace defkv::engine {
namespace {

using json = nlohmann::json;

class Stories : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string root = defkv::testing::TestdataDir() + "/models/stories260K";
    std::ifstream in(root + "/golden.json");
    if (!in) return;
    golden_ = new json(json::parse(in));
    EngineOptions opts;
    opts.model_dir = root + "/hf";
    auto g = Generator::Create(opts);
    ASSERT_TRUE(g.ok()) << g.status();
    gen_ = g->release();
  }
  static void TearDownTestSuite() {
    delete gen_;
    delete golden_;
    gen_ = nullptr;
    golden_ = nullptr;
  }
  void SetUp() override {
    DEFKV_REQUIRE_TESTDATA();
    ASSERT_NE(gen_, nullptr) << "stories260K did not load";
  }
  static GenerateResult Run(GenerateRequest req, const TextCallback& cb = {}) {
    auto r = gen_->Generate(req, cb);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : GenerateResult{};
  }
  static GenerateRequest Raw(const std::string& prompt, int n) {
    GenerateRequest r;
    r.raw_prompt = prompt;
    r.max_new_tokens = n;
    return r;
  }
  static inline Generator* gen_ = nullptr;
  static inline json* golden_ = nullptr;
};

TEST_F(Stories, GreedyStoryEqualsGolden) {
  const json& g = (*golden_)["greedy_fp32"]["once_upon_a_time"];
  auto expected = g["greedy_next_80"].get<std::vector<int32_t>>();
  auto prompt = gen_->Tokenize(Raw(g["text"], 1));
  ASSERT_TRUE(prompt.ok());
  EXPECT_EQ(prompt->context, g["input_ids"].get<std::vector<int32_t>>());
  GenerateResult r = Run(Raw(g["text"], static_cast<int>(expected.size())));
  EXPECT_EQ(r.token_ids, expected);
  EXPECT_EQ(r.text, g["decoded"].get<std::string>());
  EXPECT_EQ(r.finish_reason, FinishReason::kLength);
  EXPECT_EQ(r.usage.generated_tokens, 80);
  // Every layer holds prompt + generated - 1 entries per kv head (the last token is never fed).
  EXPECT_EQ(r.usage.kv_entries, 5 * 4 * (5 + 80 - 1));
  EXPECT_EQ(r.usage.kv_bytes, r.usage.kv_entries * 8 * 2 * 4);
}

TEST_F(Stories, BosOnlyPromptEqualsGolden) {
  const json& g = (*golden_)["greedy_fp32"]["empty_prompt_bos_only"];
  auto expected = g["greedy_next_64"].get<std::vector<int32_t>>();
  GenerateResult r = Run(Raw("", static_cast<int>(expected.size())));
  EXPECT_EQ(r.token_ids, expected);
  EXPECT_EQ(r.text, g["decoded"].get<std::string>());
}

TEST_F(Stories, StreamedPiecesConcatenateToTheAnswer) {
  std::string streamed;
  int pieces = 0;
  std::vector<int32_t> ids;
  GenerateResult r = Run(Raw("Once upon a time", 40), [&](std::string_view s, std::span<const int32_t> new_ids) {
    streamed += s;
    ids.insert(ids.end(), new_ids.begin(), new_ids.end());
    ++pieces;
    return true;
  });
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(ids, r.token_ids);
  EXPECT_GT(pieces, 10);
}

TEST_F(Stories, StopStringEndsTheAnswerBeforeIt) {
  GenerateRequest req = Raw("Once upon a time", 80);
  req.stop = {"Lily"};
  std::string streamed;
  GenerateResult r = Run(req, [&](std::string_view s, std::span<const int32_t>) { streamed += s; return true; });
  EXPECT_EQ(r.finish_reason, FinishReason::kStopString);
  EXPECT_EQ(r.text, ", there was a little girl named ");
  EXPECT_EQ(streamed, r.text);  // the partial "Li" was never streamed
}

TEST_F(Stories, CancelFromTheCallbackStops) {
  int calls = 0;
  GenerateResult r = Run(Raw("Once upon a time", 80), [&](std::string_view, std::span<const int32_t>) { return ++calls < 3; });
  EXPECT_EQ(r.finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(calls, 3);
  EXPECT_LT(r.usage.generated_tokens, 80);
}

TEST_F(Stories, CancelCheckStopsBetweenSteps) {
  int polls = 0;
  auto r = gen_->Generate(Raw("Once upon a time", 80), {}, [&] { return ++polls > 5; });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->finish_reason, FinishReason::kCancelled);
  EXPECT_LT(r->usage.generated_tokens, 10);
  auto before = gen_->Generate(Raw("Once upon a time", 80), {}, [] { return true; });
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(before->finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(before->usage.generated_tokens, 0);
}

TEST_F(Stories, SamplingIsReproducibleBySeed) {
  GenerateRequest req = Raw("Once upon a time", 40);
  req.sampling = {.temperature = 1.0, .top_k = 50, .top_p = 0.95, .seed = 11};
  GenerateResult a = Run(req), b = Run(req);
  req.sampling.seed = 12;
  GenerateResult c = Run(req);
  EXPECT_EQ(a.token_ids, b.token_ids);
  EXPECT_EQ(a.text, b.text);
  EXPECT_NE(a.token_ids, c.token_ids);
}

// One DecodeStep over greedy and sampled sequences together: greedy rows take the argmax where
// the logits are, sampled rows go to the host sampler; each output equals the request run alone.
TEST_F(Stories, BatchedStepOfGreedyAndSampledEqualsEachAlone) {
  std::vector<GenerateRequest> reqs = {Raw("Once upon a time", 30), Raw("Lily and Tom", 25), Raw("The sun", 30),
                                       Raw("One day, a big dog", 20)};
  reqs[1].sampling = {.temperature = 0.9, .top_k = 40, .top_p = 0.9, .seed = 5};
  reqs[3].sampling = {.temperature = 1.2, .top_k = 0, .top_p = 1.0, .seed = 9};
  std::vector<std::vector<int32_t>> alone;
  for (const auto& r : reqs) alone.push_back(Run(r).token_ids);
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (const auto& r : reqs) {
    auto s = gen_->Start(r);
    ASSERT_TRUE(s.ok()) << s.status();
    while ((*s)->prefilling()) ASSERT_TRUE(gen_->PrefillStep(**s).ok());
    seqs.push_back(std::move(*s));
  }
  int steps = 0, widest = 0;
  for (;; ++steps) {
    std::vector<Sequence*> batch;
    for (auto& s : seqs)
      if (!s->done()) batch.push_back(s.get());
    if (batch.empty()) break;
    widest = std::max(widest, static_cast<int>(batch.size()));
    ASSERT_TRUE(gen_->DecodeStep(batch).ok());
  }
  EXPECT_EQ(widest, 4);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_FALSE(alone[i].empty()) << i;
    EXPECT_EQ(seqs[i]->result().token_ids, alone[i]) << "request " << i;
  }
}

TEST_F(Stories, ContextAndQuestionWithoutTemplateFollowKvpress) {
  GenerateRequest req;
  req.context = "Once upon a time";
  req.question = " there was";
  auto p = gen_->Tokenize(req);
  ASSERT_TRUE(p.ok()) << p.status();
  // No chat template: context = bos_token + context, question = question + "\n".
  ASSERT_FALSE(p->context.empty());
  EXPECT_EQ(p->context[0], 1);
  EXPECT_EQ(std::vector<int32_t>(p->context.begin() + 1, p->context.end()),
            (std::vector<int32_t>{403, 407, 261, 378}));
  ASSERT_FALSE(p->question.empty());
  EXPECT_EQ(p->question.back(), 13);  // "\n" is byte-fallback <0x0A>
}

TEST_F(Stories, BadRequestsAreRejected) {
  GenerateRequest req = Raw("Once", 4);
  req.sampling.top_p = 0;
  EXPECT_EQ(gen_->Generate(req).status().code(), absl::StatusCode::kInvalidArgument);
  req = Raw("Once", 600);  // beyond max_position_embeddings (512)
  auto r = gen_->Generate(req);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(r.status().message().find("512"), std::string::npos);
  req = Raw("Once", 0);
  auto z = gen_->Generate(req);
  ASSERT_TRUE(z.ok());
  EXPECT_TRUE(z->text.empty());
  EXPECT_EQ(z->finish_reason, FinishReason::kLength);
}

}  // namespace
}  // namespace defkv::engine
