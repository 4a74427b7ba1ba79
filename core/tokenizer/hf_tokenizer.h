// Byte-level and SentencePiece-style BPE tokenizers described by tokenizer.json, or by the
// GPT-2 style vocab.json + merges.txt pair.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace defkv::tok {

// `config_path` is tokenizer_config.json beside the file, or empty when there is none.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerJson(const std::string& path,
                                                             const std::string& config_path);
// The same from an already parsed tokenizer.json document; `path` names it in errors and
// `origin` says where it came from in Describe().
absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromJson(const nlohmann::json& root,
                                                             const nlohmann::json& config,
                                                             const std::string& path,
                                                             const std::string& origin);
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadVocabMerges(const std::string& vocab_path,
                                                           const std::string& merges_path,
                                                           const std::string& config_path);

}  // namespace defkv::tok
