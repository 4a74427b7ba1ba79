#include "core/tokenizer/pipeline_tokenizer.h"

#include "core/tokenizer/unicode.h"

namespace defkv::tok {

std::vector<int32_t> PipelineTokenizer::Encode(std::string_view input, bool parse_special) const {
  // HF only ever sees valid text (Python str); bad bytes become U+FFFD the way Python would
  // decode them with errors="replace".
  std::string repaired;
  std::string_view text = input;
  if (!IsValidUtf8(input)) {
    repaired = Utf8Lossy(input);
    text = repaired;
  }
  std::vector<int32_t> ids;
  for (const auto& seg : added_.Split(text, /*normalized_set=*/false, parse_special)) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    const std::string norm = normalizer_.Apply(std::string(text.substr(seg.begin, seg.end - seg.begin)));
    const bool first = seg.begin == 0;
    if (!added_.has_normalized()) {
      EncodeText(norm, first, ids);
      continue;
    }
    for (const auto& sub : added_.Split(norm, /*normalized_set=*/true, parse_special)) {
      if (sub.id >= 0) {
        ids.push_back(sub.id);
      } else {
        EncodeText(std::string_view(norm).substr(sub.begin, sub.end - sub.begin),
                   first && sub.begin == 0, ids);
      }
    }
  }
  return ids;
}

std::string PipelineTokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (const AddedToken* t = added_.ById(id)) {
      if (skip_special && t->special) continue;
      tokens.push_back(t->content);
      continue;
    }
    std::string tok = ModelIdToToken(id);
    if (!tok.empty()) tokens.push_back(std::move(tok));  // unknown ids are dropped, as in HF
  }
  return decoder_.Decode(std::move(tokens));
}

int32_t PipelineTokenizer::vocab_size() const {
  return std::max(ModelMaxId(), added_.max_id()) + 1;
}

std::optional<int32_t> PipelineTokenizer::TokenToId(std::string_view token) const {
  if (auto id = added_.IdOf(token)) return id;
  return ModelTokenToId(token);
}

std::string PipelineTokenizer::IdToToken(int32_t id) const {
  if (const AddedToken* t = added_.ById(id)) return t->content;
  return ModelIdToToken(id);
}

bool PipelineTokenizer::IsSpecial(int32_t id) const {
  const AddedToken* t = added_.ById(id);
  return t != nullptr && t->special;
}

}  // namespace defkv::tok
