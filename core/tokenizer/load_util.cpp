#include "core/tokenizer/load_util.h"

#include <algorithm>
#include <stdexcept>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace defkv::tok {

absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open file"));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return ss.str();
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  auto bytes = ReadFileBytes(path);
  if (!bytes.ok()) return bytes.status();
  try {
    return nlohmann::json::parse(*bytes);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON: ", e.what()));
  }
}

namespace {
constexpr int64_t kMaxTokenId = int64_t{1} << 24;
int32_t CheckedId(int64_t id, const std::string& shown) {
  if (id < 0 || id >= kMaxTokenId) throw std::out_of_range("token id " + shown + " is not in [0, 16777216)");
  return static_cast<int32_t>(id);
}
}  // namespace

int32_t TokenId(const nlohmann::json& v) {
  if (!v.is_number_integer()) throw std::out_of_range("token id " + v.dump() + " is not an integer");
  return CheckedId(v.is_number_unsigned() ? static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), kMaxTokenId))
                                          : v.get<int64_t>(),
                   v.dump());
}

int32_t TokenId(const std::string& decimal) {
  if (decimal.empty() || decimal.size() > 9 || decimal.find_first_not_of("0123456789") != std::string::npos)
    throw std::out_of_range("token id \"" + decimal + "\" is not a decimal integer");
  return CheckedId(std::stoll(decimal), decimal);
}

std::optional<std::string> TokenContent(const nlohmann::json& config, const char* key) {
  if (!config.is_object() || !config.contains(key)) return std::nullopt;
  const auto& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace defkv::tok
