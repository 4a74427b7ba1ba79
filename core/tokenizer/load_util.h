// File reading and JSON parsing with errors that name the file.
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace defkv::tok {

absl::StatusOr<std::string> ReadFileBytes(const std::string& path);
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

// A token id read from JSON (a number, or a decimal string for added_tokens_decoder keys): an
// integer in [0, 2^24). Anything else throws std::out_of_range, which loaders turn into a status
// naming the file; the bound keeps a hostile file from sizing tables by a huge id.
int32_t TokenId(const nlohmann::json& v);
int32_t TokenId(const std::string& decimal);

// A token given in tokenizer_config.json, either as "text" or as {"content": "text", ...}.
std::optional<std::string> TokenContent(const nlohmann::json& config, const char* key);

}  // namespace defkv::tok
