// config.json and generation_config.json of a HuggingFace model directory, for the Llama
// family (llama, qwen2, qwen3, mistral). Both transformers spellings are read:
//   v4: "rope_theta" + "rope_scaling" {"rope_type"|"type", ...}, "torch_dtype"
//   v5: "rope_parameters" {"rope_type", "rope_theta", ...}, "dtype"
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace defkv::model {

enum class RopeType { kDefault, kLinear, kLlama3 };

struct RopeConfig {
  RopeType type = RopeType::kDefault;
  double theta = 10000.0;
  double factor = 1.0;                  // linear, llama3
  double low_freq_factor = 1.0;         // llama3
  double high_freq_factor = 4.0;        // llama3
  int64_t original_max_position = 8192; // llama3
};

struct ModelConfig {
  std::string model_type;  // "llama", "qwen2", "qwen3" or "mistral"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;    // qwen2; llama's attention_bias (which also biases o_proj)
  bool o_bias = false;      // llama attention_bias only
  bool mlp_bias = false;    // llama mlp_bias
  bool qk_norm = false;     // qwen3: RMSNorm over head_dim on q and k before RoPE
  std::string dtype = "float32";  // the checkpoint's declared dtype
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // generation_config.json wins over config.json
};

// Reads <dir>/config.json (required) and <dir>/generation_config.json (optional). Errors name
// the file and the field.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);
// The same from JSON text (the fuzz target and unit tests use it). gen_json may be empty.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& config_json,
                                             const std::string& gen_json,
                                             const std::string& config_name = "config.json");

}  // namespace defkv::model
