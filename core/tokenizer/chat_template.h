// Chat templates of the families defkv serves, chosen from tokenizer_config.json's
// "chat_template" (and bos/eos tokens there). Jinja is not interpreted: the template text is
// recognised as one of the known formats (llama3, chatml/qwen, mistral) and rendered by C++
// code that produces exactly what transformers' apply_chat_template produces for it.
// Plain text (no template) is the fallback.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace defkv::tok {

struct ChatMessage {
  std::string role;     // "system", "user" or "assistant"
  std::string content;
};

enum class ChatFormat { kPlain, kLlama3, kChatML, kMistral };

class ChatTemplate {
 public:
  // Reads <dir>/tokenizer_config.json. A missing file or a missing "chat_template" gives kPlain;
  // a template that is present but of no known format is an error naming the file.
  static absl::StatusOr<ChatTemplate> FromModelDir(const std::string& dir);
  static ChatTemplate Plain();

  ChatFormat format() const { return format_; }
  const char* name() const;  // "plain", "llama3", "chatml", "mistral"

  // Renders like apply_chat_template(messages, tokenize=False,
  // add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking). Plain format
  // joins the contents. enable_thinking matters only to templates that read it (Qwen3: false
  // appends an empty <think></think> block to the generation prompt, as kvpress asks for).
  std::string Render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                     bool enable_thinking = true) const;
  // Llama-3.1 templates print "Today Date: <date_string>"; by default today's local date as
  // "%d %b %Y", like transformers' strftime_now.
  void set_date_string(std::string date) { date_string_ = std::move(date); }

 private:
  std::string DateString() const;

  ChatFormat format_ = ChatFormat::kPlain;
  std::string bos_token_;
  std::string eos_token_;
  // Format-specific details read from the template text (e.g. Qwen3's default system prompt
  // handling, Llama-3.1's date header) go here.
  bool generation_prompt_always_ = false;  // llama3 templates that ignore add_generation_prompt
  bool qwen3_reasoning_ = false;           // chatml with Qwen3's <think> handling
  std::string default_system_;             // chatml: system prompt used when none is given
  bool thinking_switch_ = false;           // the template reads enable_thinking
  bool date_header_ = false;               // Llama-3.1: system header with knowledge/today dates
  std::string date_string_;                // empty: today
};

}  // namespace defkv::tok
