// The normalizer, pre-tokenizer and decoder stages of a tokenizer.json pipeline, built from
// their JSON descriptions. Only the types the Llama / Qwen / Mistral families use are known;
// any other type is an error that says which.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tokenizer/pcre_regex.h"
#include "nlohmann/json.hpp"

namespace defkv::tok {

class Normalizer {
 public:
  // A null JSON value gives the identity.
  static absl::StatusOr<Normalizer> FromJson(const nlohmann::json& j);
  std::string Apply(std::string s) const;

 private:
  struct Step {
    enum Kind { kNfc, kPrepend, kReplace } kind;
    std::string a, b;
  };
  std::vector<Step> steps_;
};

// A piece of text on its way to the model; `first` marks the piece that starts at offset 0 of
// the original input (Metaspace's prepend_scheme "first" needs it).
struct PreToken {
  std::string text;
  bool first = false;
};

class PreTokenizer {
 public:
  static absl::StatusOr<PreTokenizer> FromJson(const nlohmann::json& j);
  // Byte-level BPE as Qwen2's and GPT-2's fast tokenizers set it up for vocab.json + merges.txt.
  static absl::StatusOr<PreTokenizer> ByteLevelWithRegex(const std::string& pattern);
  void Apply(std::vector<PreToken>& pieces) const;
  bool byte_level() const;

 private:
  enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
  struct Step {
    enum Kind { kSplit, kByteLevel, kMetaspace } kind;
    std::shared_ptr<PcreRegex> regex;  // Split, and ByteLevel with use_regex
    Behavior behavior = Behavior::kIsolated;
    bool invert = false;
    bool add_prefix_space = false;  // ByteLevel
    std::string replacement;        // Metaspace
    std::string prepend_scheme;     // Metaspace: always, first, never
    bool split = false;             // Metaspace
  };
  static absl::StatusOr<Step> StepFromJson(const nlohmann::json& j);
  static void SplitPiece(const PreToken& piece, const std::vector<std::pair<size_t, size_t>>& hits,
                         Behavior behavior, bool invert, std::vector<PreToken>& out);
  std::vector<Step> steps_;
};

class Decoder {
 public:
  static absl::StatusOr<Decoder> FromJson(const nlohmann::json& j);
  static Decoder ByteLevel();
  // Token strings to text, the way HF's decode_chain + join("") does.
  std::string Decode(std::vector<std::string> tokens) const;

 private:
  struct Step {
    enum Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip } kind;
    std::string a, b;         // Replace pattern/content; Metaspace replacement
    bool prepend = true;      // Metaspace: prepend_scheme != never
    std::string strip_char;   // Strip content
    int start = 0, stop = 0;  // Strip counts
  };
  static absl::Status AddFromJson(const nlohmann::json& j, std::vector<Step>& steps);
  std::vector<Step> steps_;
  bool has_decoder_ = false;  // without one, HF joins tokens with spaces
};

}  // namespace defkv::tok
