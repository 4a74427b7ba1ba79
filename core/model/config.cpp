#include "core/model/config.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace defkv::model {
namespace {

using json = nlohmann::json;

class Reader {
 public:
  Reader(const json& j, std::string file) : j_(j), file_(std::move(file)) {}

  absl::Status Err(const std::string& key, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(file_, ": \"", key, "\" ", what));
  }
  // Required positive integer.
  absl::StatusOr<int64_t> Int(const std::string& key) const {
    auto it = j_.find(key);
    if (it == j_.end()) return Err(key, "is missing");
    if (!it->is_number_integer() || it->get<int64_t>() <= 0) return Err(key, "must be a positive integer");
    return it->get<int64_t>();
  }
  absl::StatusOr<int64_t> IntOr(const std::string& key, int64_t dflt) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return dflt;
    return Int(key);
  }
  absl::StatusOr<double> NumOr(const json& obj, const std::string& key, double dflt) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return dflt;
    if (!it->is_number()) return Err(key, "must be a number");
    return it->get<double>();
  }
  absl::StatusOr<bool> BoolOr(const std::string& key, bool dflt) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return dflt;
    if (!it->is_boolean()) return Err(key, "must be true or false");
    return it->get<bool>();
  }
  const json& j() const { return j_; }

 private:
  const json& j_;
  std::string file_;
};

#define DEFKV_ASSIGN(lhs, expr)          \
  do {                                   \
    auto _v = (expr);                    \
    if (!_v.ok()) return _v.status();    \
    lhs = *_v;                           \
  } while (0)

absl::Status ParseRope(const Reader& r, ModelConfig& c) {
  const json& j = r.j();
  // v5 nests everything in rope_parameters; v4 has rope_theta at top level and rope_scaling.
  const json* params = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) params = &*it;
  else if (auto it2 = j.find("rope_scaling"); it2 != j.end() && it2->is_object()) params = &*it2;

  DEFKV_ASSIGN(c.rope.theta, r.NumOr(j, "rope_theta", 10000.0));
  if (params == nullptr) return absl::OkStatus();
  DEFKV_ASSIGN(c.rope.theta, r.NumOr(*params, "rope_theta", c.rope.theta));
  std::string type = "default";
  if (auto it = params->find("rope_type"); it != params->end() && it->is_string()) type = *it;
  else if (auto it2 = params->find("type"); it2 != params->end() && it2->is_string()) type = *it2;
  if (type == "default") {
    c.rope.type = RopeType::kDefault;
  } else if (type == "linear") {
    c.rope.type = RopeType::kLinear;
    DEFKV_ASSIGN(c.rope.factor, r.NumOr(*params, "factor", 1.0));
  } else if (type == "llama3") {
    c.rope.type = RopeType::kLlama3;
    DEFKV_ASSIGN(c.rope.factor, r.NumOr(*params, "factor", 8.0));
    DEFKV_ASSIGN(c.rope.low_freq_factor, r.NumOr(*params, "low_freq_factor", 1.0));
    DEFKV_ASSIGN(c.rope.high_freq_factor, r.NumOr(*params, "high_freq_factor", 4.0));
    double orig = 8192;
    DEFKV_ASSIGN(orig, r.NumOr(*params, "original_max_position_embeddings", 8192));
    c.rope.original_max_position = static_cast<int64_t>(orig);
    if (c.rope.high_freq_factor <= c.rope.low_freq_factor)
      return r.Err("rope_scaling.high_freq_factor", "must exceed low_freq_factor");
  } else {
    return r.Err("rope_type", absl::StrCat("\"", type, "\" is not supported (default, linear, llama3 are)"));
  }
  if (c.rope.factor <= 0) return r.Err("factor", "must be positive");
  if (c.rope.theta <= 0) return r.Err("rope_theta", "must be positive");
  return absl::OkStatus();
}

void ReadEosIds(const json& j, std::vector<int64_t>& out) {
  auto it = j.find("eos_token_id");
  if (it == j.end()) return;
  out.clear();
  if (it->is_number_integer()) out.push_back(it->get<int64_t>());
  else if (it->is_array())
    for (auto& v : *it)
      if (v.is_number_integer()) out.push_back(v.get<int64_t>());
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& config_json, const std::string& gen_json,
                                             const std::string& config_name) {
  json j = json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(config_name, ": not valid JSON (expected an object)"));
  Reader r(j, config_name);
  ModelConfig c;
  auto mt = j.find("model_type");
  if (mt == j.end() || !mt->is_string()) return r.Err("model_type", "is missing");
  c.model_type = *mt;
  if (c.model_type != "llama" && c.model_type != "qwen2" && c.model_type != "qwen3" &&
      c.model_type != "mistral")
    return r.Err("model_type", absl::StrCat("\"", c.model_type,
                                            "\" is not supported (llama, qwen2, qwen3, mistral are)"));
  DEFKV_ASSIGN(c.vocab_size, r.Int("vocab_size"));
  DEFKV_ASSIGN(c.hidden_size, r.Int("hidden_size"));
  DEFKV_ASSIGN(c.intermediate_size, r.Int("intermediate_size"));
  DEFKV_ASSIGN(c.num_layers, r.Int("num_hidden_layers"));
  DEFKV_ASSIGN(c.num_heads, r.Int("num_attention_heads"));
  DEFKV_ASSIGN(c.num_kv_heads, r.IntOr("num_key_value_heads", c.num_heads));
  if (c.hidden_size % c.num_heads != 0 && !j.contains("head_dim"))
    return r.Err("hidden_size", "is not divisible by num_attention_heads and head_dim is absent");
  DEFKV_ASSIGN(c.head_dim, r.IntOr("head_dim", c.hidden_size / c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0)
    return r.Err("num_key_value_heads", "must divide num_attention_heads");
  if (c.head_dim % 2 != 0) return r.Err("head_dim", "must be even (RoPE rotates pairs)");
  DEFKV_ASSIGN(c.max_position_embeddings, r.IntOr("max_position_embeddings", 4096));
  DEFKV_ASSIGN(c.rms_norm_eps, r.NumOr(j, "rms_norm_eps", 1e-6));
  DEFKV_ASSIGN(c.tie_word_embeddings, r.BoolOr("tie_word_embeddings", false));
  if (auto act = j.find("hidden_act"); act != j.end() && act->is_string() && *act != "silu")
    return r.Err("hidden_act", absl::StrCat("\"", act->get<std::string>(), "\" is not supported (silu is)"));
  if (auto s = ParseRope(r, c); !s.ok()) return s;

  if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // Qwen2 always biases q/k/v and never o.
  } else {
    bool attn_bias = false;
    DEFKV_ASSIGN(attn_bias, r.BoolOr("attention_bias", false));
    c.qkv_bias = c.o_bias = attn_bias;
  }
  DEFKV_ASSIGN(c.mlp_bias, r.BoolOr("mlp_bias", false));
  c.qk_norm = c.model_type == "qwen3";

  for (const char* key : {"dtype", "torch_dtype"}) {
    if (auto it = j.find(key); it != j.end() && it->is_string()) {
      c.dtype = *it;
      break;
    }
  }
  if (c.dtype != "float32" && c.dtype != "bfloat16" && c.dtype != "float16")
    return r.Err("dtype", absl::StrCat("\"", c.dtype, "\" is not supported (float32, bfloat16, float16 are)"));
  if (auto it = j.find("bos_token_id"); it != j.end() && it->is_number_integer())
    c.bos_token_id = it->get<int64_t>();
  ReadEosIds(j, c.eos_token_ids);

  if (!gen_json.empty()) {
    json g = json::parse(gen_json, nullptr, /*allow_exceptions=*/false);
    if (g.is_discarded() || !g.is_object())
      return absl::InvalidArgumentError("generation_config.json: not valid JSON (expected an object)");
    ReadEosIds(g, c.eos_token_ids);
    if (auto it = g.find("bos_token_id"); it != g.end() && it->is_number_integer())
      c.bos_token_id = it->get<int64_t>();
  }
  for (int64_t id : c.eos_token_ids)
    if (id < 0 || id >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("eos_token_id ", id, " is outside the vocabulary (", c.vocab_size, ")"));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  namespace fs = std::filesystem;
  auto read = [](const fs::path& p) -> std::optional<std::string> {
    std::ifstream in(p, std::ios::binary);
    if (!in) return std::nullopt;
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  const fs::path cfg_path = fs::path(dir) / "config.json";
  if (!fs::is_directory(dir)) return absl::NotFoundError(absl::StrCat(dir, ": model directory does not exist"));
  auto cfg = read(cfg_path);
  if (!cfg) return absl::NotFoundError(absl::StrCat(cfg_path.string(), ": missing (not a HuggingFace model directory?)"));
  auto gen = read(fs::path(dir) / "generation_config.json");
  return ParseModelConfig(*cfg, gen.value_or(""), cfg_path.string());
}

}  // namespace defkv::model
