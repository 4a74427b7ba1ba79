// SentencePiece .model files, encoded by libsentencepiece but split and spaced the way
// transformers' tokenizer converted from the same file does (the reference for parity).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/tokenizer/tokenizer.h"

namespace defkv::tok {

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& path,
                                                             const std::string& config_path);

}  // namespace defkv::tok
