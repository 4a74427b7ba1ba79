// File reading and JSON parsing with errors that name the file.
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace defkv::tok {

absl::StatusOr<std::string> ReadFileBytes(const std::string& path);
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

// A token given in tokenizer_config.json, either as "text" or as {"content": "text", ...}.
std::optional<std::string> TokenContent(const nlohmann::json& config, const char* key);

}  // namespace defkv::tok
