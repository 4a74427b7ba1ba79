#include "server/logging.h"

#include <memory>
#include <string>

#include "spdlog/sinks/stdout_sinks.h"

namespace defkv::server {
namespace {

bool g_json = false;

// Text values are printed bare when they are one plain word, quoted (JSON-escaped) otherwise, so a
// request id or an error message can never forge extra key=value pairs or lines.
std::string TextValue(const nlohmann::ordered_json& v) {
  if (!v.is_string()) return v.dump();
  const auto& s = v.get_ref<const std::string&>();
  bool plain = !s.empty();
  for (unsigned char c : s)
    if (c <= ' ' || c == '"' || c == '=' || c >= 0x7f) plain = false;
  return plain ? s : v.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace

absl::Status SetupLogging(std::string_view format, std::string_view level) {
  if (format != "text" && format != "json")
    return absl::InvalidArgumentError("--log_format must be text or json, got '" + std::string(format) + "'");
  const auto lvl = spdlog::level::from_str(std::string(level));
  // from_str maps unknown names to "off"; only accept "off" when it was asked for.
  if (lvl == spdlog::level::off && level != "off")
    return absl::InvalidArgumentError("--log_level must be one of trace, debug, info, warn, error, critical, off; got '" +
                                      std::string(level) + "'");
  g_json = format == "json";
  auto logger = std::make_shared<spdlog::logger>("defkv", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  if (g_json) {
    // The message body is the rest of a JSON object (LogEvent writes it); timestamps in UTC.
    logger->set_pattern(R"({"ts":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l",%v})", spdlog::pattern_time_type::utc);
  } else {
    logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%L%$ %v");
  }
  logger->set_level(lvl);
  logger->flush_on(spdlog::level::info);  // request lines must reach the collector promptly
  spdlog::set_default_logger(std::move(logger));
  return absl::OkStatus();
}

void LogEvent(spdlog::level::level_enum level, std::string_view msg, const nlohmann::ordered_json& fields) {
  auto* logger = spdlog::default_logger_raw();
  if (!logger->should_log(level)) return;
  constexpr auto kReplace = nlohmann::ordered_json::error_handler_t::replace;  // never throw on bad UTF-8
  if (g_json) {
    nlohmann::ordered_json obj;
    obj["msg"] = std::string(msg);
    if (fields.is_object())
      for (const auto& [k, v] : fields.items()) obj[k] = v;
    std::string body = obj.dump(-1, ' ', false, kReplace);
    // Strip the braces: the logger's pattern supplies them around ts and level.
    logger->log(level, "{}", std::string_view(body).substr(1, body.size() - 2));
    return;
  }
  std::string line(msg);
  if (fields.is_object())
    for (const auto& [k, v] : fields.items()) line += " " + k + "=" + TextValue(v);
  logger->log(level, "{}", line);
}

}  // namespace defkv::server
