// What every defkv tokenizer shares: splitting on added tokens, the normalizer, the decoder
// chain and the bookkeeping of ids. Subclasses supply the model that turns a stretch of plain
// text into ids.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "core/tokenizer/added_vocab.h"
#include "core/tokenizer/hf_components.h"
#include "core/tokenizer/tokenizer.h"

namespace defkv::tok {

class PipelineTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool parse_special = true) const override;
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const override;
  int32_t vocab_size() const override;
  std::optional<int32_t> TokenToId(std::string_view token) const override;
  std::string IdToToken(int32_t id) const override;
  bool IsSpecial(int32_t id) const override;
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }
  bool lossless() const override { return lossless_; }
  std::string Describe() const override { return describe_; }

 protected:
  // Encodes text with no added token in it (already normalized); `first` when it begins the
  // input, which Metaspace's prepend_scheme "first" depends on.
  virtual void EncodeText(std::string_view text, bool first, std::vector<int32_t>& out) const = 0;
  virtual std::optional<int32_t> ModelTokenToId(std::string_view token) const = 0;
  // Empty when the id is not in the model's vocab.
  virtual std::string ModelIdToToken(int32_t id) const = 0;
  virtual int32_t ModelMaxId() const = 0;

  AddedVocab added_;
  Normalizer normalizer_;
  Decoder decoder_;
  std::optional<int32_t> bos_id_, eos_id_;
  bool lossless_ = false;
  std::string describe_;
};

}  // namespace defkv::tok
