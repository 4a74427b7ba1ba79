#include "core/tokenizer/added_vocab.h"

#include <algorithm>

#include "core/tokenizer/unicode.h"

namespace defkv::tok {

void AddedVocab::Add(const AddedToken& token) {
  if (token.content.empty()) return;
  size_t idx;
  if (auto it = by_content_.find(token.content); it != by_content_.end()) {
    idx = it->second;
    by_id_.erase(tokens_[idx].id);
    tokens_[idx] = token;
  } else {
    idx = tokens_.size();
    tokens_.push_back(token);
    by_content_[token.content] = idx;
    by_first_byte_[static_cast<unsigned char>(token.content[0])].push_back(idx);
  }
  by_id_[token.id] = idx;
  has_normalized_ = has_normalized_ || token.normalized;
  auto& bucket = by_first_byte_[static_cast<unsigned char>(token.content[0])];
  std::stable_sort(bucket.begin(), bucket.end(), [&](size_t a, size_t b) {
    return tokens_[a].content.size() > tokens_[b].content.size();
  });
}

const AddedToken* AddedVocab::ById(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

std::optional<int32_t> AddedVocab::IdOf(std::string_view content) const {
  auto it = by_content_.find(absl::string_view(content.data(), content.size()));
  if (it == by_content_.end()) return std::nullopt;
  return tokens_[it->second].id;
}

int32_t AddedVocab::max_id() const {
  int32_t m = -1;
  for (const auto& t : tokens_) m = std::max(m, t.id);
  return m;
}

namespace {

// The code point that ends at `end` (exclusive), or 0 at the start of the text.
char32_t CodePointBefore(std::string_view s, size_t end) {
  if (end == 0) return 0;
  size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
  return NextCodePoint(s, &b);
}

// Approximates Rust's char::is_alphanumeric for single_word: ASCII letters/digits and '_',
// and any non-ASCII character that is not whitespace.
bool IsWordChar(char32_t c) {
  if (c == 0) return false;
  if (c < 0x80) return std::isalnum(static_cast<int>(c)) || c == '_';
  return !IsUnicodeWhitespace(c);
}

}  // namespace

std::vector<AddedVocab::Segment> AddedVocab::Split(std::string_view text, bool normalized_set,
                                                   bool parse_special) const {
  std::vector<Segment> out;
  size_t emitted = 0;  // end of what `out` covers
  size_t pos = 0;
  while (pos < text.size()) {
    // Leftmost-longest: the first position with any match, its longest token.
    const AddedToken* hit = nullptr;
    for (size_t idx : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
      const AddedToken& t = tokens_[idx];
      if (t.normalized != normalized_set) continue;
      if (text.compare(pos, t.content.size(), t.content) == 0) {
        hit = &t;
        break;
      }
    }
    if (hit == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + hit->content.size();
    pos = stop;  // the matcher resumes after the raw match, whatever stripping does
    if (hit->special && !parse_special) continue;
    if (hit->single_word) {
      const bool space_before = !IsWordChar(CodePointBefore(text, start));
      size_t after = stop;
      const bool space_after =
          stop == text.size() || !IsWordChar(NextCodePoint(text, &after));
      if (!space_before || !space_after) continue;
    }
    if (start < emitted) continue;  // swallowed by an earlier token's rstrip
    if (hit->lstrip) {
      size_t b = start;
      while (b > emitted) {
        size_t cb = b - 1;
        while (cb > 0 && (static_cast<unsigned char>(text[cb]) & 0xC0) == 0x80) --cb;
        size_t tmp = cb;
        if (!IsUnicodeWhitespace(NextCodePoint(text, &tmp))) break;
        b = cb;
      }
      start = b;
    }
    if (hit->rstrip) {
      while (stop < text.size()) {
        size_t tmp = stop;
        if (!IsUnicodeWhitespace(NextCodePoint(text, &tmp))) break;
        stop = tmp;
      }
    }
    if (emitted < start) out.push_back({emitted, start, -1});
    out.push_back({start, stop, hit->id});
    emitted = stop;
  }
  if (emitted < text.size()) out.push_back({emitted, text.size(), -1});
  return out;
}

}  // namespace defkv::tok
