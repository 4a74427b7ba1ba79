#include "core/tokenizer/hf_tokenizer.h"

#include "absl/strings/str_cat.h"
#include "core/tokenizer/bpe_model.h"
#include "core/tokenizer/load_util.h"
#include "core/tokenizer/pipeline_tokenizer.h"

namespace defkv::tok {

using nlohmann::json;

namespace {

// Qwen2's fast tokenizer: contractions, letters with one leading non-letter, single digits.
constexpr const char* kQwen2Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

class HfBpeTokenizer : public PipelineTokenizer {
 public:
  HfBpeTokenizer(std::unique_ptr<BpeModel> model, PreTokenizer pre) 
      : model_(std::move(model)), pre_(std::move(pre)) {}

  void SetUp(AddedVocab added, Normalizer norm, Decoder dec, std::string describe, bool lossless) {
    added_ = std::move(added);
    normalizer_ = std::move(norm);
    decoder_ = std::move(dec);
    describe_ = absl::StrCat(describe, ", ", vocab_size());
    lossless_ = lossless;
  }
  void SetSpecialIds(const json& config) {
    if (auto b = TokenContent(config, "bos_token")) bos_id_ = TokenToId(*b);
    if (auto e = TokenContent(config, "eos_token")) eos_id_ = TokenToId(*e);
  }

 protected:
  void EncodeText(std::string_view text, bool first, std::vector<int32_t>& out) const override {
    std::vector<PreToken> pieces{{std::string(text), first}};
    pre_.Apply(pieces);
    for (const PreToken& p : pieces) model_->Tokenize(p.text, out);
  }
  std::optional<int32_t> ModelTokenToId(std::string_view t) const override {
    return model_->TokenToId(t);
  }
  std::string ModelIdToToken(int32_t id) const override { return model_->IdToToken(id); }
  int32_t ModelMaxId() const override { return model_->max_id(); }

 private:
  std::unique_ptr<BpeModel> model_;
  PreTokenizer pre_;
};

AddedToken AddedFromJson(const json& j, int32_t id) {
  AddedToken t;
  t.id = id;
  t.content = j.value("content", "");
  t.single_word = j.value("single_word", false);
  t.lstrip = j.value("lstrip", false);
  t.rstrip = j.value("rstrip", false);
  t.normalized = j.value("normalized", false);
  t.special = j.value("special", false);
  return t;
}

absl::StatusOr<json> ReadConfig(const std::string& config_path) {
  if (config_path.empty()) return json::object();
  return ReadJsonFile(config_path);
}

absl::Status Wrap(const std::string& path, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerJson(const std::string& path,
                                                             const std::string& config_path) {
  auto root = ReadJsonFile(path);
  if (!root.ok()) return root.status();
  auto config = ReadConfig(config_path);
  if (!config.ok()) return config.status();
  return TokenizerFromJson(*root, *config, path, "tokenizer.json");
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromJson(const json& root_json,
                                                             const json& config_json,
                                                             const std::string& path,
                                                             const std::string& origin) {
  const json* root = &root_json;
  const json* config = &config_json;
  try {
    const json& m = root->at("model");
    const std::string type = m.value("type", "");
    if (type != "BPE") {
      return absl::UnimplementedError(
          absl::StrCat(path, ": unsupported model type '", type, "' (only BPE is supported)"));
    }
    absl::flat_hash_map<std::string, int32_t> vocab;
    vocab.reserve(m.at("vocab").size());
    for (const auto& [tok, id] : m.at("vocab").items()) vocab[tok] = TokenId(id);
    std::vector<std::pair<std::string, std::string>> merges;
    merges.reserve(m.at("merges").size());
    for (const auto& mj : m.at("merges")) {
      if (mj.is_array() && mj.size() == 2) {
        merges.emplace_back(mj[0].get<std::string>(), mj[1].get<std::string>());
      } else if (mj.is_string()) {
        const std::string s = mj.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos)
          return absl::InvalidArgumentError(absl::StrCat(path, ": bad merge '", s, "'"));
        merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else {
        return absl::InvalidArgumentError(absl::StrCat(path, ": bad merge entry"));
      }
    }
    BpeOptions opt;
    opt.byte_fallback = m.value("byte_fallback", false);
    opt.fuse_unk = m.value("fuse_unk", false);
    opt.ignore_merges = m.value("ignore_merges", false);
    if (m.contains("unk_token") && m["unk_token"].is_string())
      opt.unk_token = m["unk_token"].get<std::string>();
    if (m.contains("continuing_subword_prefix") && m["continuing_subword_prefix"].is_string())
      opt.continuing_subword_prefix = m["continuing_subword_prefix"].get<std::string>();
    if (m.contains("end_of_word_suffix") && m["end_of_word_suffix"].is_string())
      opt.end_of_word_suffix = m["end_of_word_suffix"].get<std::string>();
    if (m.contains("dropout") && m["dropout"].is_number() && m["dropout"].get<double>() > 0)
      return absl::UnimplementedError(absl::StrCat(path, ": BPE dropout is not supported"));

    auto norm = Normalizer::FromJson(root->value("normalizer", json()));
    if (!norm.ok()) return Wrap(path, norm.status());
    auto pre = PreTokenizer::FromJson(root->value("pre_tokenizer", json()));
    if (!pre.ok()) return Wrap(path, pre.status());
    auto dec = Decoder::FromJson(root->value("decoder", json()));
    if (!dec.ok()) return Wrap(path, dec.status());

    AddedVocab added;
    if (root->contains("added_tokens")) {
      for (const auto& a : root->at("added_tokens")) added.Add(AddedFromJson(a, TokenId(a.at("id"))));
    }
    const bool byte_level = pre->byte_level();
    const bool has_norm = !root->value("normalizer", json()).is_null();
    auto model = std::make_unique<BpeModel>(std::move(vocab), merges, opt);
    const std::string describe =
        absl::StrCat(origin, " BPE (", byte_level ? "byte-level" : "sentencepiece-style",
                     opt.byte_fallback ? ", byte fallback" : "", ")");
    auto tok = std::make_unique<HfBpeTokenizer>(std::move(model), std::move(*pre));
    // Byte-level without a normalizer round-trips any text; the legacy Prepend scheme does too
    // (decoding strips exactly the one space it adds) when special tokens are not parsed.
    bool lossless = byte_level && !has_norm;
    if (!byte_level && opt.byte_fallback && has_norm && root->value("pre_tokenizer", json()).is_null())
      lossless = true;
    tok->SetUp(std::move(added), std::move(*norm), std::move(*dec), describe, lossless);
    tok->SetSpecialIds(*config);
    return std::unique_ptr<Tokenizer>(std::move(tok));
  } catch (const std::exception& e) {  // json errors and TokenId's range errors
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed tokenizer: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadVocabMerges(const std::string& vocab_path,
                                                           const std::string& merges_path,
                                                           const std::string& config_path) {
  auto vj = ReadJsonFile(vocab_path);
  if (!vj.ok()) return vj.status();
  auto mtext = ReadFileBytes(merges_path);
  if (!mtext.ok()) return mtext.status();
  auto config = ReadConfig(config_path);
  if (!config.ok()) return config.status();
  if (!vj->is_object())
    return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": expected a JSON object"));
  absl::flat_hash_map<std::string, int32_t> vocab;
  try {
    for (const auto& [tok, id] : vj->items()) vocab[tok] = TokenId(id);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": ", e.what()));
  }
  std::vector<std::pair<std::string, std::string>> merges;
  for (size_t at = 0; at < mtext->size();) {
    size_t nl = mtext->find('\n', at);
    if (nl == std::string::npos) nl = mtext->size();
    std::string line = mtext->substr(at, nl - at);
    at = nl + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    const size_t sp = line.find(' ');
    if (sp == std::string::npos)
      return absl::InvalidArgumentError(absl::StrCat(merges_path, ": bad merge line '", line, "'"));
    merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
  }
  const std::string cls = config->value("tokenizer_class", "");
  const bool qwen = cls.rfind("Qwen2", 0) == 0;
  auto pre = qwen ? PreTokenizer::ByteLevelWithRegex(kQwen2Pattern)
                  : PreTokenizer::FromJson(json{{"type", "ByteLevel"},
                                                {"add_prefix_space", false},
                                                {"use_regex", true}});
  if (!pre.ok()) return pre.status();
  auto norm = Normalizer::FromJson(qwen ? json{{"type", "NFC"}} : json());
  if (!norm.ok()) return norm.status();

  AddedVocab added;
  if (config->contains("added_tokens_decoder") && (*config)["added_tokens_decoder"].is_object()) {
    try {
      for (const auto& [id, a] : (*config)["added_tokens_decoder"].items()) added.Add(AddedFromJson(a, TokenId(id)));
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": added_tokens_decoder: ", e.what()));
    }
  }
  auto model = std::make_unique<BpeModel>(std::move(vocab), merges, BpeOptions{});
  auto tok = std::make_unique<HfBpeTokenizer>(std::move(model), std::move(*pre));
  tok->SetUp(std::move(added), std::move(*norm), Decoder::ByteLevel(),
             qwen ? "vocab.json+merges.txt BPE (byte-level, Qwen2)" : "vocab.json+merges.txt BPE (byte-level)",
             !qwen);
  tok->SetSpecialIds(*config);
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace defkv::tok
