#include <gtest/gtest.h>

#include "core/model/config.h"

namespace defkv::model {
namespace {

constexpr const char* kV4 = R"({
  "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "rope_theta": 500000.0, "torch_dtype": "bfloat16", "eos_token_id": [7, 9],
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})";

constexpr const char* kV5 = R"({
  "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "dtype": "bfloat16", "eos_token_id": [7, 9],
  "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}})";

TEST(ModelConfig, BothTransformersSpellingsGiveTheSameConfig) {
  auto v4 = ParseModelConfig(kV4, "");
  auto v5 = ParseModelConfig(kV5, "");
  ASSERT_TRUE(v4.ok()) << v4.status();
  ASSERT_TRUE(v5.ok()) << v5.status();
  for (const auto* c : {&*v4, &*v5}) {
    EXPECT_EQ(c->rope.type, RopeType::kLlama3);
    EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
    EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
    EXPECT_EQ(c->rope.original_max_position, 8192);
    EXPECT_EQ(c->dtype, "bfloat16");
    EXPECT_EQ(c->head_dim, 16);
    EXPECT_EQ(c->num_kv_heads, 2);
    EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{7, 9}));
  }
}

TEST(ModelConfig, GenerationConfigEosWins) {
  auto c = ParseModelConfig(kV5, R"({"eos_token_id": 5, "bos_token_id": 3})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{5}));
  EXPECT_EQ(c->bos_token_id, 3);
}

TEST(ModelConfig, FamilyFlags) {
  std::string qwen2 = kV5, qwen3 = kV5;
  qwen2.replace(qwen2.find("\"llama\""), 7, "\"qwen2\"");
  qwen3.replace(qwen3.find("\"llama\""), 7, "\"qwen3\"");
  auto a = ParseModelConfig(qwen2, "");
  auto b = ParseModelConfig(qwen3, "");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(a->qkv_bias);
  EXPECT_FALSE(a->o_bias);
  EXPECT_FALSE(a->qk_norm);
  EXPECT_TRUE(b->qk_norm);
  EXPECT_FALSE(b->qkv_bias);
}

TEST(ModelConfig, ErrorsNameTheFileAndField) {
  auto bad_json = ParseModelConfig("{not json", "", "/m/config.json");
  EXPECT_FALSE(bad_json.ok());
  EXPECT_NE(bad_json.status().message().find("/m/config.json"), std::string::npos);

  std::string unknown = kV5;
  unknown.replace(unknown.find("\"llama\""), 7, "\"gpt2\"");
  auto u = ParseModelConfig(unknown, "", "/m/config.json");
  ASSERT_FALSE(u.ok());
  EXPECT_NE(u.status().message().find("model_type"), std::string::npos);
  EXPECT_NE(u.status().message().find("gpt2"), std::string::npos);

  std::string no_layers = kV5;
  no_layers.replace(no_layers.find("\"num_hidden_layers\": 2,"), 23, "");
  auto n = ParseModelConfig(no_layers, "", "/m/config.json");
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.status().message().find("num_hidden_layers"), std::string::npos);

  std::string yarn = kV5;
  yarn.replace(yarn.find("\"rope_type\": \"llama3\""), 21, "\"rope_type\": \"dynamic\"");
  auto y = ParseModelConfig(yarn, "");
  ASSERT_FALSE(y.ok());
  EXPECT_NE(y.status().message().find("dynamic"), std::string::npos);

  std::string bad_heads = kV5;
  bad_heads.replace(bad_heads.find("\"num_key_value_heads\": 2"), 24, "\"num_key_value_heads\": 3");
  EXPECT_FALSE(ParseModelConfig(bad_heads, "").ok());
}

}  // namespace
}  // namespace defkv::model
