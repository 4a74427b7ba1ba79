#include "core/tokenizer/sp_backend.h"

#include <sentencepiece_processor.h>

namespace defkv::tok {

SpBackend::SpBackend() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
SpBackend::~SpBackend() = default;

std::string SpBackend::LoadFromSerialized(const std::string& proto) {
  const auto st = sp_->LoadFromSerializedProto(proto);
  return st.ok() ? "" : st.ToString();
}

int SpBackend::piece_size() const { return sp_->GetPieceSize(); }
std::string SpBackend::IdToPiece(int id) const { return sp_->IdToPiece(id); }
int SpBackend::PieceToId(std::string_view piece) const { return sp_->PieceToId(piece); }
int SpBackend::bos_id() const { return sp_->bos_id(); }
int SpBackend::eos_id() const { return sp_->eos_id(); }
int SpBackend::unk_id() const { return sp_->unk_id(); }

bool SpBackend::Encode(const std::string& text, std::vector<int>* ids) const {
  return sp_->Encode(text, ids).ok();
}

}  // namespace defkv::tok
