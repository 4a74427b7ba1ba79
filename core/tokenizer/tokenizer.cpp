#include "core/tokenizer/tokenizer.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "core/tokenizer/hf_tokenizer.h"
#include "core/tokenizer/sp_tokenizer.h"

namespace defkv::tok {

namespace fs = std::filesystem;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec))
    return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  const bool is_dir = fs::is_directory(path, ec);
  const fs::path dir = is_dir ? fs::path(path) : fs::path(path).parent_path();
  const fs::path config = dir / "tokenizer_config.json";
  const std::string config_path = fs::exists(config, ec) ? config.string() : "";

  if (is_dir) {
    if (fs::exists(dir / "tokenizer.json", ec))
      return LoadTokenizerJson((dir / "tokenizer.json").string(), config_path);
    if (fs::exists(dir / "vocab.json", ec) && fs::exists(dir / "merges.txt", ec))
      return LoadVocabMerges((dir / "vocab.json").string(), (dir / "merges.txt").string(),
                             config_path);
    if (fs::exists(dir / "tokenizer.model", ec))
      return LoadSentencePiece((dir / "tokenizer.model").string(), config_path);
    return absl::NotFoundError(absl::StrCat(
        path, ": no tokenizer.json, vocab.json + merges.txt or tokenizer.model in this folder"));
  }
  const std::string name = fs::path(path).filename().string();
  if (name == "vocab.json" || name == "merges.txt") {
    const fs::path vocab = dir / "vocab.json", merges = dir / "merges.txt";
    if (!fs::exists(vocab, ec) || !fs::exists(merges, ec))
      return absl::NotFoundError(
          absl::StrCat(path, ": vocab.json and merges.txt must both be in ", dir.string()));
    return LoadVocabMerges(vocab.string(), merges.string(), config_path);
  }
  if (name.find(".model") != std::string::npos) return LoadSentencePiece(path, config_path);
  if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".json") == 0)
    return LoadTokenizerJson(path, config_path);
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": unknown tokenizer file (expected tokenizer.json, vocab.json, "
                         "merges.txt or a SentencePiece .model)"));
}

// ---- IncrementalDecoder ----

namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

bool EndsWithReplacement(const std::string& s) {
  return s.size() >= 3 && std::string_view(s).substr(s.size() - 3) == kReplacement;
}

// "<0xNN>": a ByteFallback run is decoded as a whole (one invalid byte spoils the run), so no
// text is final while a run may still be growing.
bool IsByteToken(const std::string& t) {
  return t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>';
}

}  // namespace

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(tokenizer), skip_special_(skip_special) {}

std::string IncrementalDecoder::Push(int32_t id) {
  ids_.push_back(id);
  if (IsByteToken(tokenizer_.IdToToken(id))) return "";
  const std::vector<int32_t> context(ids_.begin() + prefix_offset_, ids_.begin() + read_offset_);
  const std::vector<int32_t> window(ids_.begin() + prefix_offset_, ids_.end());
  const std::string before = tokenizer_.Decode(context, skip_special_);
  const std::string now = tokenizer_.Decode(window, skip_special_);
  // A trailing U+FFFD may be half a character whose other bytes are still to come.
  if (EndsWithReplacement(now) || now.size() <= before.size() ||
      now.compare(0, before.size(), before) != 0) {
    return "";
  }
  std::string out = now.substr(before.size());
  emitted_bytes_ += out.size();
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return out;
}

std::string IncrementalDecoder::Flush() {
  const std::vector<int32_t> context(ids_.begin() + prefix_offset_, ids_.begin() + read_offset_);
  const std::vector<int32_t> window(ids_.begin() + prefix_offset_, ids_.end());
  const std::string before = tokenizer_.Decode(context, skip_special_);
  const std::string now = tokenizer_.Decode(window, skip_special_);
  std::string out;
  if (now.size() > before.size() && now.compare(0, before.size(), before) == 0)
    out = now.substr(before.size());
  emitted_bytes_ += out.size();
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return out;
}

}  // namespace defkv::tok
