// Layer-major context prefill (model::LayerMajorPrefill) is the token-major prefill (Forward
// chunk by chunk) in another order: on fp32 CPU the logits, the kept positions, the cache and
// the greedy continuation are bit-identical, for every press kind; and a compressing press
// holds at most one full-size layer at a time. Through the Generator: the same tokens and kept
// positions as the token-major reference, and a KV reservation that never under-reports.
#include <algorithm>
#include <filesystem>
#include <memory>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/engine/compressor.h"
#include "core/engine/generator.h"
#include "core/model/transformer.h"
#include "core/press/registry.h"
#include "tests/unit/testdata.h"

namespace defkv::engine {
namespace {

constexpr int64_t kContext = 150, kChunk = 32, kExtra = 8, kDecode = 6;
const char* const kPresses[] = {"none", "snapkv", "defensivekv", "adakv", "layer_defensivekv"};

std::string ModelDir(const std::string& name) {
  if (name == "stories260K") return defkv::testing::TestdataDir() + "/models/stories260K/hf";
  return std::string(DEFKV_TINY_MODELS) + "/" + name;
}

// One prefill of `ids` (token-major or layer-major) with `press_name` at ratio 0.5, then kDecode
// greedy steps.
struct Outcome {
  at::Tensor logits;                                      // [1, vocab] of the last context token
  std::vector<std::vector<std::vector<int32_t>>> kept;    // [layer][head] positions
  std::vector<at::Tensor> keys;                           // per (layer, head), after compaction
  std::vector<int64_t> tokens;                            // greedy continuation
  int64_t bytes_reserved = 0;                             // after the prefill (and Finish)
};

Outcome Prefill(const model::Transformer& m, const at::Tensor& ids, const std::string& press_name, bool layer_major) {
  Outcome out;
  const auto& cfg = m.config();
  const int64_t n = ids.size(0);
  auto cache = m.NewCache();
  cache->Reserve(n + kExtra);
  std::unique_ptr<press::Press> press;
  if (press_name != "none") press = *press::MakePress(press_name, {});
  std::unique_ptr<Compressor> comp;
  if (press) comp = std::make_unique<Compressor>(m, *cache, *press, 0.5, n, kExtra, /*keep_positions=*/true);
  const int64_t eb = cache->entry_bytes(), full_layer = cfg.num_kv_heads * (n + kExtra) * eb;
  if (layer_major) {
    model::LayerMajorPrefill prefill(m, ids, 0, kChunk, *cache, comp.get());
    while (!prefill.Step(/*budget=*/1)) {  // one (layer, chunk) piece at a time
      // Layers before prefill.layer() are done (compacted to kept + extra per head when the
      // press decides per layer, full size otherwise); at most one more is allocated.
      int64_t bound = full_layer;
      for (int64_t l = 0; l < prefill.layer(); ++l)
        for (int64_t h = 0; h < cfg.num_kv_heads; ++h)
          bound += ((comp ? comp->kept()[l][h] : n) + kExtra) * eb;
      EXPECT_LE(cache->bytes_reserved(), bound) << press_name << " before layer " << prefill.layer();
      EXPECT_LE(cache->bytes_reserved(), (prefill.layer() + 1) * full_layer) << press_name;
    }
    out.logits = prefill.Logits();
  } else {
    for (int64_t b = 0; b < n; b += kChunk) {
      const int64_t c = std::min(kChunk, n - b);
      if (comp) comp->BeginChunk(b + c == n);
      out.logits = m.Forward(ids.narrow(0, b, c), at::arange(b, b + c, at::kLong), *cache, false, comp.get());
    }
  }
  if (comp) {
    comp->Finish();
    out.kept = comp->positions();
  }
  out.bytes_reserved = cache->bytes_reserved();
  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (int64_t h = 0; h < cfg.num_kv_heads; ++h) out.keys.push_back(cache->head_keys(l, h).clone());
  int64_t next = out.logits[0].argmax().item<int64_t>();
  for (int64_t s = 0; s < kDecode; ++s) {
    out.tokens.push_back(next);
    at::Tensor step = m.Forward(at::full({1}, next, at::kLong), at::full({1}, n + s, at::kLong), *cache);
    next = step[0].argmax().item<int64_t>();
  }
  return out;
}

class LayerMajor : public ::testing::TestWithParam<std::string> {};

TEST_P(LayerMajor, EqualsTokenMajorBitForBit) {
  if (GetParam() == "stories260K") DEFKV_REQUIRE_TESTDATA();
  const std::string dir = ModelDir(GetParam());
  ASSERT_TRUE(std::filesystem::exists(dir + "/config.json")) << dir;
  auto m = model::Transformer::Load(dir, {});  // fp32 on CPU
  ASSERT_TRUE(m.ok()) << m.status();
  at::InferenceMode guard;
  at::manual_seed(7);
  const at::Tensor ids = at::randint(3, std::min<int64_t>(320, (*m)->config().vocab_size), {kContext}, at::kLong);
  for (const char* name : kPresses) {
    SCOPED_TRACE(name);
    Outcome a = Prefill(**m, ids, name, /*layer_major=*/false), b = Prefill(**m, ids, name, /*layer_major=*/true);
    EXPECT_TRUE(a.logits.equal(b.logits)) << "max diff " << (a.logits - b.logits).abs().max().item<double>();
    EXPECT_EQ(a.kept, b.kept);
    ASSERT_EQ(a.keys.size(), b.keys.size());
    for (size_t i = 0; i < a.keys.size(); ++i) EXPECT_TRUE(a.keys[i].equal(b.keys[i])) << "(layer, head) " << i;
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_EQ(a.bytes_reserved, b.bytes_reserved);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, LayerMajor, ::testing::Values("llama_gqa2", "qwen3", "mistral", "stories260K"));

TEST(LayerMajorPrefill, ContextShorterThanAChunkAndEmpty) {
  auto m = model::Transformer::Load(ModelDir("llama_gqa2"), {});
  ASSERT_TRUE(m.ok()) << m.status();
  at::InferenceMode guard;
  const at::Tensor ids = at::randint(3, 300, {5}, at::kLong);
  auto ca = (*m)->NewCache(), cb = (*m)->NewCache();
  at::Tensor ref = (*m)->Forward(ids, at::arange(5, at::kLong), *ca);
  model::LayerMajorPrefill p(**m, ids, 0, kChunk, *cb);
  EXPECT_TRUE(p.Step(1 << 20));
  EXPECT_TRUE(p.Logits().equal(ref));
  model::LayerMajorPrefill empty(**m, at::empty({0}, at::kLong), 0, kChunk, *cb);
  EXPECT_TRUE(empty.done());
  EXPECT_THROW(empty.Logits(), c10::Error);
}

// Layer-DefensiveKV's one budget over every layer: while the context is prefilled, the layers
// done hold about that budget (each may lag its running candidates by under a 64th, and at
// least one entry), not each layer's first candidates. stories260K has 5 layers; at ratio 0.8
// the budget is one layer's worth, so from the second layer on the earlier ones shrink again.
TEST(LayerMajorPrefill, LayerDefensiveKVHoldsAboutItsBudget) {
  DEFKV_REQUIRE_TESTDATA();
  auto m = model::Transformer::Load(ModelDir("stories260K"), {});
  ASSERT_TRUE(m.ok()) << m.status();
  at::InferenceMode guard;
  at::manual_seed(11);
  const auto& cfg = (*m)->config();
  const int64_t n = 200, heads = cfg.num_kv_heads;
  const at::Tensor ids = at::randint(3, cfg.vocab_size, {n}, at::kLong);
  auto cache = (*m)->NewCache();
  cache->Reserve(n + kExtra);
  auto press = *press::MakePress("layer_defensivekv", {});
  Compressor comp(**m, *cache, *press, 0.8, n, kExtra);
  // The press's budget, int(L (1 - r) H N_L) in doubles as the reference computes it (799 here).
  const auto total = static_cast<int64_t>(static_cast<double>(n) * (1.0 - 0.8) * static_cast<double>(heads) *
                                          static_cast<double>(cfg.num_layers));
  model::LayerMajorPrefill prefill(**m, ids, 0, kChunk, *cache, &comp);
  int64_t checked = 0, most_before = 0;
  while (!prefill.Step(/*budget=*/1)) {
    const int64_t done = prefill.layer();
    int64_t held = 0;
    for (int64_t l = 0; l < done; ++l) held += cache->entries(l);
    if (done * heads * n <= total) {  // the press drops nothing while every entry fits
      EXPECT_EQ(held, done * heads * n) << "before layer " << done << ": nothing is dropped within the budget";
      continue;
    }
    EXPECT_LE(held, total + total / 64 + done) << "before layer " << done;
    // Without the earlier layers narrowed again, the first layer alone would still hold all
    // its entries here (it was within the budget when scored).
    most_before = std::max(most_before, done);
    ++checked;
  }
  EXPECT_GE(most_before, cfg.num_layers - 1);
  EXPECT_GT(checked, 0);
  EXPECT_LT(cache->entries(0), heads * n) << "the first layer was never narrowed again";
  comp.Finish();
  int64_t kept = 0;
  for (int64_t l = 0; l < cfg.num_layers; ++l) kept += cache->entries(l);
  EXPECT_EQ(kept, total);
}

// ---- through the Generator (stories260K, prefill_chunk 16) ----

class LayerMajorGenerator : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    EngineOptions o;
    o.model_dir = ModelDir("stories260K");
    o.prefill_chunk = 16;
    if (!std::filesystem::exists(o.model_dir)) return;
    auto g = Generator::Create(o);
    ASSERT_TRUE(g.ok()) << g.status();
    gen_ = g->release();
    auto m = model::Transformer::Load(o.model_dir, {});
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static void TearDownTestSuite() {
    delete gen_;
    delete model_;
  }
  void SetUp() override {
    DEFKV_REQUIRE_TESTDATA();
    ASSERT_NE(gen_, nullptr);
  }
  static GenerateRequest Request(const std::string& press) {
    GenerateRequest r;
    r.raw_prompt =
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
        "friends. One day, she saw a big red ball near the tree. She wanted to play with it, but it was too high. "
        "Lily asked her mom for help. Her mom smiled and said, \"Let's get it together!\" They found a long stick "
        "and pushed the ball down. Lily was very happy and said thank you to her mom. They played with the ball "
        "all day long, and when the sun went down, they went home to eat dinner.";
    r.max_new_tokens = 12;
    r.press = press;
    r.compression_ratio = press == "none" ? 0.0 : 0.5;
    r.report_kept_positions = true;
    return r;
  }
  static inline Generator* gen_ = nullptr;
  static inline model::Transformer* model_ = nullptr;
};

TEST_F(LayerMajorGenerator, TokensAndKeptPositionsEqualTheTokenMajorReference) {
  at::InferenceMode guard;
  for (const char* name : kPresses) {
    SCOPED_TRACE(name);
    GenerateRequest req = Request(name);
    auto prompt = gen_->Tokenize(req);
    ASSERT_TRUE(prompt.ok());
    const int64_t n = static_cast<int64_t>(prompt->context.size());
    ASSERT_GT(n, 4 * 16);
    ASSERT_TRUE(prompt->question.empty());
    auto r = gen_->Generate(req);
    ASSERT_TRUE(r.ok()) << r.status();

    // The token-major reference: Forward chunk by chunk with the press, then greedy decode
    // steps through ForwardBatch, as DecodeStep runs them.
    std::vector<int64_t> ids64(prompt->context.begin(), prompt->context.end());
    const at::Tensor ids = at::tensor(ids64, at::kLong);
    auto cache = model_->NewCache();
    cache->Reserve(n + req.max_new_tokens);
    std::unique_ptr<press::Press> press;
    if (std::string(name) != "none") press = *press::MakePress(name, {});
    std::unique_ptr<Compressor> comp;
    if (press) comp = std::make_unique<Compressor>(*model_, *cache, *press, 0.5, n, req.max_new_tokens, true);
    at::Tensor logits;
    for (int64_t b = 0; b < n; b += 16) {
      const int64_t c = std::min<int64_t>(16, n - b);
      if (comp) comp->BeginChunk(b + c == n);
      logits = model_->Forward(ids.narrow(0, b, c), at::arange(b, b + c, at::kLong), *cache, false, comp.get());
    }
    if (comp) {
      comp->Finish();
      EXPECT_EQ(r->compression.positions, comp->positions());
      EXPECT_EQ(r->compression.kept, comp->kept());
    }
    std::vector<int32_t> tokens;
    int64_t next = logits[0].argmax().item<int64_t>();
    const auto& eos = model_->config().eos_token_ids;
    for (int64_t s = 0; s < req.max_new_tokens; ++s) {
      if (std::find(eos.begin(), eos.end(), next) != eos.end()) break;
      tokens.push_back(static_cast<int32_t>(next));
      if (s + 1 == req.max_new_tokens) break;
      at::Tensor step = model_->ForwardBatch(at::full({1}, next, at::kLong), at::full({1}, n + s, at::kLong),
                                             {cache.get()});
      next = step[0].argmax().item<int64_t>();
    }
    EXPECT_EQ(r->token_ids, tokens);
  }
}

TEST_F(LayerMajorGenerator, PrefillStepTokensSetsTheWorkPerStepNotTheResult) {
  // prefill_step_tokens x layers token-layers per step, at least one chunk (16 tokens) through
  // one layer: 1 gives one chunk-layer per step, 48 three chunks through every layer's share.
  GenerateRequest req = Request("snapkv");
  const int64_t n = static_cast<int64_t>(gen_->Tokenize(req)->context.size());
  const int64_t layers = gen_->info().num_layers, chunks = (n + 15) / 16;
  auto reference = gen_->Generate(req);
  ASSERT_TRUE(reference.ok()) << reference.status();
  for (int step_tokens : {1, 48}) {
    SCOPED_TRACE(step_tokens);
    EngineOptions o;
    o.model_dir = ModelDir("stories260K");
    o.prefill_chunk = 16;
    o.prefill_step_tokens = step_tokens;
    auto g = Generator::Create(o);
    ASSERT_TRUE(g.ok()) << g.status();
    auto seq = (*g)->Start(req);
    ASSERT_TRUE(seq.ok()) << seq.status();
    int64_t steps = 0;
    while ((*seq)->prefilling()) {
      ASSERT_TRUE((*g)->PrefillStep(**seq).ok());
      ++steps;
    }
    // A step runs chunk-layers in order (chunk 0..chunks-1 through layer 0, then layer 1, ...)
    // until it has done step_tokens x layers token-layers.
    int64_t expected = 0, spent = 0;
    for (int64_t l = 0; l < layers; ++l)
      for (int64_t c = 0; c < chunks; ++c) {
        if (spent == 0) ++expected;
        spent += std::min<int64_t>(16, n - c * 16);
        if (spent >= step_tokens * layers) spent = 0;
      }
    EXPECT_EQ(steps, expected);
    EXPECT_GE(steps, step_tokens == 1 ? chunks * layers / 4 : chunks / 3);
    (*seq)->Cancel();
    auto r = (*g)->Generate(req);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->token_ids, reference->token_ids);
    EXPECT_EQ(r->compression.positions, reference->compression.positions);
  }
  EngineOptions bad;
  bad.model_dir = ModelDir("stories260K");
  bad.prefill_step_tokens = -1;
  auto g = Generator::Create(bad);
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LayerMajorGenerator, ReservationCoversThePeakWhilePrefilling) {
  for (const char* name : {"none", "snapkv"}) {
    SCOPED_TRACE(name);
    GenerateRequest req = Request(name);
    req.max_new_tokens = 40;
    auto seq = gen_->Start(req);
    ASSERT_TRUE(seq.ok()) << seq.status();
    Sequence& s = **seq;
    const int64_t peak = s.kv_bytes_peak();
    EXPECT_EQ(peak, (s.prompt_tokens() + req.max_new_tokens) * gen_->kv_bytes_per_token());
    int steps = 0;
    while (s.prefilling()) {
      EXPECT_GE(s.kv_bytes_reserved(), peak) << "step " << steps;
      ASSERT_TRUE(gen_->PrefillStep(s).ok());
      ++steps;
    }
    EXPECT_GT(steps, 1);
    ASSERT_FALSE(s.done());  // 40 tokens to go
    // After the prefill: what the cache holds, kept + max_new_tokens rows per (layer, head).
    const auto& info = gen_->info();
    const int64_t entry_bytes = gen_->kv_bytes_per_token() / (info.num_layers * info.num_kv_heads);
    int64_t rows = 0;
    for (const auto& layer : s.result().compression.kept)
      for (int64_t k : layer) rows += k + req.max_new_tokens;
    EXPECT_EQ(s.kv_bytes_reserved(), rows * entry_bytes);
    if (std::string(name) == "none") EXPECT_EQ(s.kv_bytes_reserved(), peak);
    else EXPECT_LT(s.kv_bytes_reserved(), peak);
    s.Cancel();
  }
}

}  // namespace
}  // namespace defkv::engine
