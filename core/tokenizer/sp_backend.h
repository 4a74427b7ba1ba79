// A thin wrapper over libsentencepiece. sentencepiece_processor.h defines its own
// absl::string_view shim that clashes with the real Abseil, so it is only ever included by
// sp_backend.cpp, which includes no Abseil header.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace defkv::tok {

class SpBackend {
 public:
  SpBackend();
  ~SpBackend();
  // Empty on success, else the library's message.
  std::string LoadFromSerialized(const std::string& proto);
  int piece_size() const;
  std::string IdToPiece(int id) const;
  int PieceToId(std::string_view piece) const;
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;
  bool Encode(const std::string& text, std::vector<int>* ids) const;

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace defkv::tok
