// libFuzzer target: encode and decode arbitrary bytes (invalid UTF-8 included) with real
// tokenizers (byte-level BPE and SentencePiece-style with byte fallback), and stream the ids
// back through the incremental decoder.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"

namespace {
std::vector<std::unique_ptr<defkv::tok::Tokenizer>>& Tokenizers() {
  static auto* all = [] {
    auto* v = new std::vector<std::unique_ptr<defkv::tok::Tokenizer>>();
    for (const char* dir : {DEFKV_FUZZ_STORIES, DEFKV_FUZZ_BYTE_LEVEL}) {
      auto t = defkv::tok::Tokenizer::Load(dir);
      if (!t.ok()) __builtin_trap();  // the fuzzer's own fixtures must load
      v->push_back(std::move(*t));
    }
    return v;
  }();
  return *all;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (const auto& tok : Tokenizers()) {
    for (bool special : {true, false}) {
      auto ids = tok->Encode(text, special);
      (void)tok->Decode(ids);
    }
    // Arbitrary ids, in and out of range, decoded whole and incrementally.
    std::vector<int32_t> ids;
    for (size_t i = 0; i + 1 < size; i += 2) ids.push_back(static_cast<int32_t>((data[i] << 8) | data[i + 1]) - 1000);
    std::vector<int32_t> valid;
    for (int32_t id : ids)
      if (id >= 0 && id < tok->vocab_size()) valid.push_back(id);
    (void)tok->Decode(valid, /*skip_special=*/true);
    defkv::tok::IncrementalDecoder dec(*tok);
    for (int32_t id : valid) (void)dec.Push(id);
    (void)dec.Flush();
  }
  return 0;
}
