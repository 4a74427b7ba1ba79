// A compiled PCRE2 pattern in UTF + UCP mode (Unicode \p{..}, \s, lookahead), JIT-compiled, for
// the pre-tokenizer Split patterns of tokenizer.json.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace defkv::tok {

class PcreRegex {
 public:
  static absl::StatusOr<std::unique_ptr<PcreRegex>> Compile(const std::string& pattern);
  ~PcreRegex();
  PcreRegex(const PcreRegex&) = delete;
  PcreRegex& operator=(const PcreRegex&) = delete;

  // Byte ranges [begin, end) of all non-overlapping, non-empty matches, left to right.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view text) const;

 private:
  explicit PcreRegex(void* code) : code_(code) {}
  void* code_;  // pcre2_code_8*, kept opaque so the header does not pull in pcre2.h
};

}  // namespace defkv::tok
