// How a request becomes prompt text, following kvpress's pipeline (spec/presses.md §1.1):
//  - with a chat template: render [{"user": context + SEP}] with the generation prompt, split at
//    SEP; the part before is the context, the part after (e.g. "<|eot_id|><|start_header_id|>
//    assistant<|end_header_id|>\n\n") is the question suffix;
//  - without one: the context is bos_token + context and the suffix is "\n";
//  - the question is question + suffix + answer_prefix.
// Both are tokenized without adding special tokens (those written in the text are parsed).
#pragma once

#include <optional>
#include <string>

#include "core/engine/generator.h"
#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"

namespace defkv::engine {

struct PromptText {
  std::string context;
  std::string question;
};

PromptText RenderPrompt(const GenerateRequest& request, const tok::ChatTemplate& chat,
                        const tok::Tokenizer& tokenizer);

// The id a raw prompt starts with, if the tokenizer adds one: tokenizer_config.json's
// add_bos_token, else tokenizer.json's post-processor template.
std::optional<int32_t> RawPromptBos(const std::string& model_dir, const tok::Tokenizer& tokenizer);

}  // namespace defkv::engine
