#include "core/tokenizer/bpe_model.h"

#include <cstdio>
#include <queue>

#include "core/tokenizer/unicode.h"

namespace defkv::tok {

namespace {
constexpr size_t kCacheMaxWords = 50000;
constexpr size_t kCacheMaxWordBytes = 128;
}  // namespace

BpeModel::BpeModel(absl::flat_hash_map<std::string, int32_t> vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges,
                   BpeOptions options)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  int32_t max_id = -1;
  for (const auto& [tok, id] : vocab_) max_id = std::max(max_id, id);
  id_to_token_.resize(static_cast<size_t>(max_id + 1));
  for (const auto& [tok, id] : vocab_) {
    if (id >= 0) id_to_token_[id] = tok;
  }
  merges_.reserve(merges.size());
  int32_t rank = 0;
  for (const auto& [a, b] : merges) {
    auto ia = vocab_.find(a), ib = vocab_.find(b);
    auto ir = vocab_.find(a + b);
    if (ia != vocab_.end() && ib != vocab_.end() && ir != vocab_.end()) {
      // A repeated pair keeps its last rank, as HF's map collected in file order does.
      merges_.insert_or_assign(PairKey(ia->second, ib->second), Merge{rank, ir->second});
    }
    ++rank;
  }
  if (options_.unk_token) {
    if (auto it = vocab_.find(*options_.unk_token); it != vocab_.end()) unk_id_ = it->second;
  }
  byte_ids_.assign(256, -1);
  if (options_.byte_fallback) {
    char name[8];
    for (int b = 0; b < 256; ++b) {
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      if (auto it = vocab_.find(name); it != vocab_.end()) byte_ids_[b] = it->second;
    }
  }
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(absl::string_view(token.data(), token.size()));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string& BpeModel::IdToToken(int32_t id) const {
  static const std::string kEmpty;
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return kEmpty;
  return id_to_token_[id];
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    if (auto it = vocab_.find(absl::string_view(word.data(), word.size())); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (auto it = cache_.find(absl::string_view(word.data(), word.size())); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  MergeWord(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() >= kCacheMaxWords) cache_.clear();
    cache_.emplace(std::string(word), std::move(ids));
  }
}

void BpeModel::MergeWord(std::string_view word, std::vector<int32_t>& out) const {
  // Initial symbols: one per character, with HF's order of fallbacks (vocab, then <0xNN> bytes,
  // then unk, fused when asked). A pending unk is only written out when a known piece follows,
  // which is how consecutive unknown characters fuse.
  std::vector<int32_t> syms;
  syms.reserve(word.size());
  std::optional<int32_t> pending_unk;
  std::string piece;
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t start = pos;
    NextCodePoint(word, &pos);
    piece.clear();
    if (start > 0) piece += options_.continuing_subword_prefix;
    piece.append(word.substr(start, pos - start));
    if (pos == word.size()) piece += options_.end_of_word_suffix;
    if (auto it = vocab_.find(piece); it != vocab_.end()) {
      if (pending_unk) syms.push_back(*std::exchange(pending_unk, std::nullopt));
      syms.push_back(it->second);
      continue;
    }
    if (options_.byte_fallback) {
      bool all = true;
      for (unsigned char b : piece) all = all && byte_ids_[b] >= 0;
      if (all) {
        for (unsigned char b : piece) syms.push_back(byte_ids_[b]);
        continue;
      }
    }
    if (unk_id_) {
      if (pending_unk && !options_.fuse_unk) syms.push_back(*pending_unk);
      pending_unk = unk_id_;
    }
  }
  if (pending_unk) syms.push_back(*pending_unk);

  // Merge the lowest-rank adjacent pair first, leftmost on ties, via a heap with lazy deletion:
  // an entry is stale when either side has since changed or been merged away.
  const int n = static_cast<int>(syms.size());
  std::vector<int> next(n), prev(n);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  struct Cand {
    int32_t rank;
    int left;
    int32_t left_id, right_id, result;
    bool operator>(const Cand& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](int left) {
    if (left < 0) return;
    const int right = next[left];
    if (right < 0) return;
    auto it = merges_.find(PairKey(syms[left], syms[right]));
    if (it == merges_.end()) return;
    heap.push({it->second.rank, left, syms[left], syms[right], it->second.result});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    if (!alive[c.left] || syms[c.left] != c.left_id) continue;
    const int right = next[c.left];
    if (right < 0 || syms[right] != c.right_id) continue;
    syms[c.left] = c.result;
    alive[right] = false;
    next[c.left] = next[right];
    if (next[right] >= 0) prev[next[right]] = c.left;
    consider(prev[c.left]);
    consider(c.left);
  }
  for (int i = 0; i < n; i = next[i]) {
    out.push_back(syms[i]);
    if (next[i] < 0) break;
  }
}

}  // namespace defkv::tok
