// Added tokens (special tokens such as "<|eot_id|>" and user-defined pieces) and how text is
// split around them before the model sees it, following HF's AddedVocabulary: leftmost-longest
// matching, then lstrip/rstrip/single_word adjustments.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace defkv::tok {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

class AddedVocab {
 public:
  // A token whose content is already present is replaced, as a later definition wins.
  void Add(const AddedToken& token);

  // A slice of the input: an added token (id >= 0) or plain text (id == -1).
  struct Segment {
    size_t begin, end;
    int32_t id;
  };
  // Splits on the tokens whose `normalized` flag equals `normalized_set`. Without
  // parse_special, special tokens are left in the text (HF's encode_special_tokens).
  std::vector<Segment> Split(std::string_view text, bool normalized_set, bool parse_special) const;

  const AddedToken* ById(int32_t id) const;
  std::optional<int32_t> IdOf(std::string_view content) const;
  bool has_normalized() const { return has_normalized_; }
  int32_t max_id() const;
  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  std::vector<AddedToken> tokens_;
  absl::flat_hash_map<int32_t, size_t> by_id_;
  absl::flat_hash_map<std::string, size_t> by_content_;
  // Token indices by first byte, longest first, so the first hit at a position is the longest.
  std::vector<std::vector<size_t>> by_first_byte_ = std::vector<std::vector<size_t>>(256);
  bool has_normalized_ = false;
};

}  // namespace defkv::tok
