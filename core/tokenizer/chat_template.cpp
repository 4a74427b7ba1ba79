#include "core/tokenizer/chat_template.h"

#include <ctime>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/tokenizer/load_util.h"
#include "core/tokenizer/unicode.h"

namespace defkv::tok {

namespace {

bool Contains(const std::string& s, std::string_view what) {
  return s.find(what) != std::string::npos;
}

// Python's str.isspace for one character: White_Space plus the separators U+001C..U+001F.
bool PyIsSpace(char32_t c) { return IsUnicodeWhitespace(c) || (c >= 0x1C && c <= 0x1F); }

// Python's str.strip() with no argument (Jinja's trim).
std::string Trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    size_t p = b;
    if (!PyIsSpace(NextCodePoint(s, &p))) break;
    b = p;
  }
  while (e > b) {
    size_t cb = e - 1;
    while (cb > b && (static_cast<unsigned char>(s[cb]) & 0xC0) == 0x80) --cb;
    size_t p = cb;
    if (!PyIsSpace(NextCodePoint(s, &p))) break;
    e = cb;
  }
  return std::string(s.substr(b, e - b));
}

std::string StripChar(std::string_view s, char c, bool left, bool right) {
  size_t b = 0, e = s.size();
  while (left && b < e && s[b] == c) ++b;
  while (right && e > b && s[e - 1] == c) --e;
  return std::string(s.substr(b, e - b));
}

bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool EndsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::FromModelDir(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "tokenizer_config.json").string();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return Plain();
  auto config = ReadJsonFile(path);
  if (!config.ok()) return config.status();
  ChatTemplate t;
  t.bos_token_ = TokenContent(*config, "bos_token").value_or("");
  t.eos_token_ = TokenContent(*config, "eos_token").value_or("");
  if (!config->is_object() || !config->contains("chat_template")) return t;
  const auto& tj = (*config)["chat_template"];
  std::string text;
  if (tj.is_string()) {
    text = tj.get<std::string>();
  } else if (tj.is_array()) {
    // Several named templates: the "default" one is what apply_chat_template uses.
    for (const auto& entry : tj)
      if (entry.value("name", "") == "default") text = entry.value("template", "");
  }
  if (text.empty()) return t;
  if (Contains(text, "<|start_header_id|>")) {
    t.format_ = ChatFormat::kLlama3;
    t.date_header_ = Contains(text, "Cutting Knowledge Date");
    t.generation_prompt_always_ = !Contains(text, "add_generation_prompt");
  } else if (Contains(text, "<|im_start|>")) {
    t.format_ = ChatFormat::kChatML;
    t.qwen3_reasoning_ = Contains(text, "reasoning_content");
    t.thinking_switch_ = Contains(text, "enable_thinking");
    if (Contains(text, "You are a helpful assistant.")) t.default_system_ = "You are a helpful assistant.";
  } else if (Contains(text, "[INST]")) {
    t.format_ = ChatFormat::kMistral;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": chat_template is of no known format (llama3, chatml, mistral)"));
  }
  return t;
}

ChatTemplate ChatTemplate::Plain() { return ChatTemplate(); }

const char* ChatTemplate::name() const {
  switch (format_) {
    case ChatFormat::kLlama3: return "llama3";
    case ChatFormat::kChatML: return "chatml";
    case ChatFormat::kMistral: return "mistral";
    case ChatFormat::kPlain: break;
  }
  return "plain";
}

std::string ChatTemplate::Render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                 bool enable_thinking) const {
  std::string out;
  switch (format_) {
    case ChatFormat::kPlain: {
      std::vector<std::string> parts;
      for (const auto& m : messages) parts.push_back(m.content);
      return absl::StrJoin(parts, "\n");
    }
    case ChatFormat::kLlama3: {
      size_t begin = 0;
      if (date_header_) {
        // Llama-3.1: the system turn always exists and opens with the two dates.
        std::string system;
        if (!messages.empty() && messages[0].role == "system") {
          system = Trim(messages[0].content);
          begin = 1;
        }
        absl::StrAppend(&out, bos_token_, "<|start_header_id|>system<|end_header_id|>\n\n",
                        "Cutting Knowledge Date: December 2023\nToday Date: ", DateString(), "\n\n", system,
                        "<|eot_id|>");
      }
      for (size_t i = begin; i < messages.size(); ++i) {
        if (i == 0 && !date_header_) out += bos_token_;
        absl::StrAppend(&out, "<|start_header_id|>", messages[i].role, "<|end_header_id|>\n\n",
                        Trim(messages[i].content), "<|eot_id|>");
      }
      if (add_generation_prompt || generation_prompt_always_)
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    }
    case ChatFormat::kMistral: {
      // Mistral v3: an optional leading system message is folded into the last user turn.
      size_t begin = 0;
      std::optional<std::string> system;
      if (!messages.empty() && messages[0].role == "system") {
        system = messages[0].content;
        begin = 1;
      }
      out += bos_token_;
      for (size_t i = begin; i < messages.size(); ++i) {
        const auto& m = messages[i];
        if (m.role == "user") {
          if (i + 1 == messages.size() && system)
            absl::StrAppend(&out, "[INST] ", *system, "\n\n", m.content, "[/INST]");
          else
            absl::StrAppend(&out, "[INST] ", m.content, "[/INST]");
        } else if (m.role == "assistant") {
          absl::StrAppend(&out, " ", Trim(m.content), eos_token_);
        }
      }
      return out;
    }
    case ChatFormat::kChatML:
      break;
  }
  if (!qwen3_reasoning_) {
    if (!default_system_.empty() && (messages.empty() || messages[0].role != "system"))
      absl::StrAppend(&out, "<|im_start|>system\n", default_system_, "<|im_end|>\n");
    for (const auto& m : messages)
      absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  // Qwen3: reasoning is shown only for assistant turns after the last real user query.
  const int n = static_cast<int>(messages.size());
  if (n > 0 && messages[0].role == "system")
    absl::StrAppend(&out, "<|im_start|>system\n", messages[0].content, "<|im_end|>\n");
  int last_query = n - 1;
  for (int i = n - 1; i >= 0; --i) {
    const auto& c = messages[i].content;
    if (messages[i].role == "user" &&
        !(StartsWith(c, "<tool_response>") && EndsWith(c, "</tool_response>"))) {
      last_query = i;
      break;
    }
  }
  for (int i = 0; i < n; ++i) {
    const auto& m = messages[i];
    if (m.role == "user" || (m.role == "system" && i != 0)) {
      absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
    } else if (m.role == "assistant") {
      std::string content = m.content, reasoning;
      if (const size_t close = m.content.rfind("</think>"); close != std::string::npos) {
        content = StripChar(std::string_view(m.content).substr(close + 8), '\n', true, false);
        std::string before = StripChar(m.content.substr(0, m.content.find("</think>")), '\n',
                                       false, true);
        const size_t open = before.rfind("<think>");
        if (open != std::string::npos) before = before.substr(open + 7);
        reasoning = StripChar(before, '\n', true, false);
      }
      if (i > last_query && (i == n - 1 || !reasoning.empty())) {
        absl::StrAppend(&out, "<|im_start|>assistant\n<think>\n", StripChar(reasoning, '\n', true, true),
                        "\n</think>\n\n", StripChar(content, '\n', true, false));
      } else {
        absl::StrAppend(&out, "<|im_start|>assistant\n", content);
      }
      out += "<|im_end|>\n";
    } else if (m.role == "tool") {
      if (i == 0 || messages[i - 1].role != "tool") out += "<|im_start|>user";
      absl::StrAppend(&out, "\n<tool_response>\n", m.content, "\n</tool_response>");
      if (i == n - 1 || messages[i + 1].role != "tool") out += "<|im_end|>\n";
    }
  }
  if (add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (thinking_switch_ && !enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

std::string ChatTemplate::DateString() const {
  if (!date_string_.empty()) return date_string_;
  const std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%d %b %Y", &local);
  return buf;
}

}  // namespace defkv::tok
