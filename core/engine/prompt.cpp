#include "core/engine/prompt.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

namespace defkv::engine {

PromptText RenderPrompt(const GenerateRequest& request, const tok::ChatTemplate& chat,
                        const tok::Tokenizer& tokenizer) {
  PromptText out;
  std::string suffix;
  if (request.use_chat_template && chat.format() != tok::ChatFormat::kPlain) {
    // kvpress's separator: long enough never to occur in the context itself.
    const std::string sep(request.context.size() + 10, '#');
    // kvpress renders with enable_thinking=False (Qwen3 then gets an empty think block).
    const std::string rendered = chat.Render({{"user", request.context + sep}}, /*add_generation_prompt=*/true,
                                             /*enable_thinking=*/false);
    const size_t at = rendered.find(sep);
    out.context = rendered.substr(0, at);
    suffix = at == std::string::npos ? "" : rendered.substr(at + sep.size());
  } else {
    if (auto bos = tokenizer.bos_id()) out.context = tokenizer.IdToToken(*bos);
    out.context += request.context;
    suffix = "\n";
  }
  out.question = request.question + suffix + request.answer_prefix;
  return out;
}

std::optional<int32_t> RawPromptBos(const std::string& model_dir, const tok::Tokenizer& tokenizer) {
  namespace fs = std::filesystem;
  using json = nlohmann::json;
  auto read_json = [](const fs::path& p) {
    std::ifstream in(p);
    return in ? json::parse(in, nullptr, false) : json();
  };
  json cfg = read_json(fs::path(model_dir) / "tokenizer_config.json");
  if (cfg.is_object()) {
    if (auto it = cfg.find("add_bos_token"); it != cfg.end() && it->is_boolean())
      return it->get<bool>() ? tokenizer.bos_id() : std::nullopt;
  }
  json tj = read_json(fs::path(model_dir) / "tokenizer.json");
  if (tj.is_object()) {
    const json& pp = tj["post_processor"];
    // TemplateProcessing (possibly inside a Sequence) whose single template starts with a token.
    auto from_template = [&](const json& p) -> std::optional<int32_t> {
      if (!p.is_object() || p.value("type", "") != "TemplateProcessing") return std::nullopt;
      const json& single = p["single"];
      if (!single.is_array() || single.empty() || !single[0].contains("SpecialToken")) return std::nullopt;
      std::string tokname = single[0]["SpecialToken"].value("id", "");
      auto id = tokenizer.TokenToId(tokname);
      return id;
    };
    if (auto id = from_template(pp)) return id;
    if (pp.is_object() && pp.value("type", "") == "Sequence" && pp["processors"].is_array())
      for (const auto& p : pp["processors"])
        if (auto id = from_template(p)) return id;
  }
  return std::nullopt;
}

}  // namespace defkv::engine
