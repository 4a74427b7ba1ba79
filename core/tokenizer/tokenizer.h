// Tokenizers of the Llama family: tokenizer.json (byte-level BPE as in Llama-3 / Qwen2 / Qwen3,
// SentencePiece-style BPE with byte fallback as in Llama-2 / Mistral / stories260K), the GPT-2
// style vocab.json + merges.txt pair, and SentencePiece .model files through libsentencepiece.
//
// Ids are int32. Encode never adds BOS/EOS by itself: callers (the engine) decide, the way
// kvpress tokenizes context and question "without special tokens" (spec/presses.md §1.1).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace defkv::tok {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads from a model directory (tokenizer.json, else vocab.json + merges.txt, else
  // tokenizer.model) or from one of those files. tokenizer_config.json, when present beside it,
  // supplies bos/eos tokens and added tokens. Errors name the file and what is wrong.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);

  // Text to ids. With parse_special, added/special tokens written in the text (e.g.
  // "<|eot_id|>") become their ids, as HF tokenizers does; without it they are plain text.
  virtual std::vector<int32_t> Encode(std::string_view text, bool parse_special = true) const = 0;
  // Ids to text; skip_special drops special (control) tokens.
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual std::string IdToToken(int32_t id) const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
  // From tokenizer_config.json / the model file; nullopt when the tokenizer has none.
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  // True when decode(encode(s)) == s for every valid UTF-8 s (byte-level BPE, byte fallback).
  virtual bool lossless() const = 0;
  // A short description for logs and GetModelInfo, e.g. "tokenizer.json BPE (byte-level), 128256".
  virtual std::string Describe() const = 0;
};

// Streams text out of generated ids without ever emitting half a UTF-8 character, and with the
// same spacing as Decode() of the whole sequence (SentencePiece's leading-space rule included).
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special = true);
  // Appends one id; returns the newly completed text (possibly empty).
  std::string Push(int32_t id);
  // Whatever is still held back (an incomplete UTF-8 tail comes out as U+FFFD).
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t emitted_bytes_ = 0;  // bytes of Decode(ids_) already returned
  // Text is decoded over a window ids_[prefix_offset_:], so each Push costs the window, not
  // the whole sequence; ids_[prefix_offset_:read_offset_] is the already-emitted context that
  // keeps spacing rules (e.g. the leading-space strip) the same as in a full Decode.
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
};

}  // namespace defkv::tok
