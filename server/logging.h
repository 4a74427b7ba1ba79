// Logging for defkv-server: one spdlog logger on stderr, either human-readable text or JSON lines
// (one object per line, for log shippers). Every log call goes through LogEvent so both formats
// carry the same structured fields.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace defkv::server {

// format: "text" or "json"; level: spdlog level name (trace, debug, info, warn, error, critical, off).
absl::Status SetupLogging(std::string_view format, std::string_view level);

// Logs `msg` with structured fields (an object; insertion order is kept). Text:
// `msg key=value ...`; JSON: {"ts":..., "level":..., "msg":..., key: value, ...}.
void LogEvent(spdlog::level::level_enum level, std::string_view msg, const nlohmann::ordered_json& fields = {});

}  // namespace defkv::server
