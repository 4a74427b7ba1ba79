#include "core/tokenizer/hf_components.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/tokenizer/unicode.h"

namespace defkv::tok {

using nlohmann::json;

namespace {

std::string TypeOf(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) return "";
  return j["type"].get<std::string>();
}

// Split and Replace patterns are {"String": s} or {"Regex": r}; a literal becomes a quoted regex.
absl::StatusOr<std::string> PatternToRegex(const json& p) {
  if (p.contains("Regex")) return p["Regex"].get<std::string>();
  if (p.contains("String")) return absl::StrCat("\\Q", p["String"].get<std::string>(), "\\E");
  return absl::InvalidArgumentError("pattern is neither String nor Regex");
}

std::string StringValue(const json& j, const char* key, const std::string& dflt) {
  return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : dflt;
}

bool BoolValue(const json& j, const char* key, bool dflt) {
  return j.contains(key) && j[key].is_boolean() ? j[key].get<bool>() : dflt;
}

constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

}  // namespace

// ---- Normalizer ----

absl::StatusOr<Normalizer> Normalizer::FromJson(const json& j) {
  Normalizer n;
  if (j.is_null()) return n;
  const std::string type = TypeOf(j);
  if (type == "Sequence") {
    for (const auto& sub : j.at("normalizers")) {
      auto s = FromJson(sub);
      if (!s.ok()) return s.status();
      n.steps_.insert(n.steps_.end(), s->steps_.begin(), s->steps_.end());
    }
  } else if (type == "NFC") {
    n.steps_.push_back({Step::kNfc, "", ""});
  } else if (type == "Prepend") {
    n.steps_.push_back({Step::kPrepend, j.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace") {
    if (!j.at("pattern").contains("String"))
      return absl::UnimplementedError("Replace normalizer with a Regex pattern is not supported");
    n.steps_.push_back(
        {Step::kReplace, j.at("pattern").at("String").get<std::string>(), j.at("content").get<std::string>()});
  } else {
    return absl::UnimplementedError(absl::StrCat("unsupported normalizer type '", type, "'"));
  }
  return n;
}

std::string Normalizer::Apply(std::string s) const {
  for (const Step& st : steps_) {
    switch (st.kind) {
      case Step::kNfc: s = NfcNormalize(s); break;
      case Step::kPrepend:
        if (!s.empty()) s = st.a + s;
        break;
      case Step::kReplace:
        if (!st.a.empty()) s = absl::StrReplaceAll(s, {{st.a, st.b}});
        break;
    }
  }
  return s;
}

// ---- PreTokenizer ----

absl::StatusOr<PreTokenizer::Step> PreTokenizer::StepFromJson(const json& j) {
  const std::string type = TypeOf(j);
  Step st;
  if (type == "Split") {
    st.kind = Step::kSplit;
    auto pattern = PatternToRegex(j.at("pattern"));
    if (!pattern.ok()) return pattern.status();
    auto re = PcreRegex::Compile(*pattern);
    if (!re.ok()) return re.status();
    st.regex = std::move(*re);
    const std::string b = StringValue(j, "behavior", "Isolated");
    if (b == "Removed") st.behavior = Behavior::kRemoved;
    else if (b == "Isolated") st.behavior = Behavior::kIsolated;
    else if (b == "MergedWithPrevious") st.behavior = Behavior::kMergedWithPrevious;
    else if (b == "MergedWithNext") st.behavior = Behavior::kMergedWithNext;
    else if (b == "Contiguous") st.behavior = Behavior::kContiguous;
    else return absl::InvalidArgumentError(absl::StrCat("unknown Split behavior '", b, "'"));
    st.invert = BoolValue(j, "invert", false);
  } else if (type == "ByteLevel") {
    st.kind = Step::kByteLevel;
    st.add_prefix_space = BoolValue(j, "add_prefix_space", true);
    if (BoolValue(j, "use_regex", true)) {
      auto re = PcreRegex::Compile(kGpt2Pattern);
      if (!re.ok()) return re.status();
      st.regex = std::move(*re);
    }
  } else if (type == "Metaspace") {
    st.kind = Step::kMetaspace;
    st.replacement = StringValue(j, "replacement", "\xE2\x96\x81");
    st.prepend_scheme = StringValue(j, "prepend_scheme", "");
    if (st.prepend_scheme.empty()) {
      // Files older than prepend_scheme carry add_prefix_space instead.
      st.prepend_scheme = BoolValue(j, "add_prefix_space", true) ? "always" : "never";
    }
    st.split = BoolValue(j, "split", true);
  } else {
    return absl::UnimplementedError(absl::StrCat("unsupported pre_tokenizer type '", type, "'"));
  }
  return st;
}

absl::StatusOr<PreTokenizer> PreTokenizer::FromJson(const json& j) {
  PreTokenizer p;
  if (j.is_null()) return p;
  if (TypeOf(j) == "Sequence") {
    for (const auto& sub : j.at("pretokenizers")) {
      auto s = FromJson(sub);
      if (!s.ok()) return s.status();
      p.steps_.insert(p.steps_.end(), s->steps_.begin(), s->steps_.end());
    }
    return p;
  }
  auto st = StepFromJson(j);
  if (!st.ok()) return st.status();
  p.steps_.push_back(std::move(*st));
  return p;
}

absl::StatusOr<PreTokenizer> PreTokenizer::ByteLevelWithRegex(const std::string& pattern) {
  return FromJson(json{{"type", "Sequence"},
                       {"pretokenizers",
                        json::array({json{{"type", "Split"},
                                          {"pattern", {{"Regex", pattern}}},
                                          {"behavior", "Isolated"},
                                          {"invert", false}},
                                     json{{"type", "ByteLevel"},
                                          {"add_prefix_space", false},
                                          {"use_regex", false}}})}});
}

bool PreTokenizer::byte_level() const {
  for (const Step& s : steps_)
    if (s.kind == Step::kByteLevel) return true;
  return false;
}

void PreTokenizer::SplitPiece(const PreToken& piece,
                              const std::vector<std::pair<size_t, size_t>>& hits,
                              Behavior behavior, bool invert, std::vector<PreToken>& out) {
  struct Part {
    size_t b, e;
    bool match;
  };
  std::vector<Part> parts;
  size_t pos = 0;
  for (auto [b, e] : hits) {
    if (b > pos) parts.push_back({pos, b, invert});
    parts.push_back({b, e, !invert});
    pos = e;
  }
  if (pos < piece.text.size()) parts.push_back({pos, piece.text.size(), invert});

  std::vector<std::pair<size_t, size_t>> ranges;
  switch (behavior) {
    case Behavior::kRemoved:
      for (const Part& p : parts)
        if (!p.match) ranges.emplace_back(p.b, p.e);
      break;
    case Behavior::kIsolated:
      for (const Part& p : parts) ranges.emplace_back(p.b, p.e);
      break;
    case Behavior::kContiguous:
      for (size_t i = 0; i < parts.size(); ++i) {
        if (parts[i].match && i > 0 && parts[i - 1].match) ranges.back().second = parts[i].e;
        else ranges.emplace_back(parts[i].b, parts[i].e);
      }
      break;
    case Behavior::kMergedWithPrevious: {
      bool prev_match = false;
      for (const Part& p : parts) {
        if (p.match && !prev_match && !ranges.empty()) ranges.back().second = p.e;
        else ranges.emplace_back(p.b, p.e);
        prev_match = p.match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool prev_match = false;  // walking backwards: "previous" is the part to the right
      for (size_t k = parts.size(); k-- > 0;) {
        const Part& p = parts[k];
        if (p.match && !prev_match && !ranges.empty()) ranges.back().first = p.b;
        else ranges.emplace_back(p.b, p.e);
        prev_match = p.match;
      }
      std::reverse(ranges.begin(), ranges.end());
      break;
    }
  }
  for (auto [b, e] : ranges) {
    if (e <= b) continue;
    out.push_back({piece.text.substr(b, e - b), piece.first && b == 0});
  }
}

void PreTokenizer::Apply(std::vector<PreToken>& pieces) const {
  for (const Step& st : steps_) {
    std::vector<PreToken> next;
    next.reserve(pieces.size());
    for (PreToken& piece : pieces) {
      switch (st.kind) {
        case Step::kSplit:
          SplitPiece(piece, st.regex->FindAll(piece.text), st.behavior, st.invert, next);
          break;
        case Step::kByteLevel: {
          if (st.add_prefix_space && (piece.text.empty() || piece.text[0] != ' '))
            piece.text.insert(0, " ");
          std::vector<PreToken> split;
          if (st.regex) {
            SplitPiece(piece, st.regex->FindAll(piece.text), Behavior::kIsolated, false, split);
          } else {
            split.push_back(std::move(piece));
          }
          for (PreToken& p : split) {
            std::string mapped;
            mapped.reserve(p.text.size() * 2);
            for (unsigned char c : p.text) mapped += ByteToUnicode(c);
            next.push_back({std::move(mapped), p.first});
          }
          break;
        }
        case Step::kMetaspace: {
          std::string t = absl::StrReplaceAll(piece.text, {{" ", st.replacement}});
          const bool starts = t.compare(0, st.replacement.size(), st.replacement) == 0;
          if (!starts && (st.prepend_scheme == "always" ||
                          (st.prepend_scheme == "first" && piece.first))) {
            t.insert(0, st.replacement);
          }
          if (!st.split) {
            next.push_back({std::move(t), piece.first});
            break;
          }
          std::vector<std::pair<size_t, size_t>> hits;
          for (size_t at = t.find(st.replacement); at != std::string::npos;
               at = t.find(st.replacement, at + st.replacement.size())) {
            hits.emplace_back(at, at + st.replacement.size());
          }
          SplitPiece({std::move(t), piece.first}, hits, Behavior::kMergedWithNext, false, next);
          break;
        }
      }
    }
    pieces = std::move(next);
  }
}

// ---- Decoder ----

absl::Status Decoder::AddFromJson(const json& j, std::vector<Step>& steps) {
  const std::string type = TypeOf(j);
  Step st;
  if (type == "Sequence") {
    for (const auto& sub : j.at("decoders")) {
      if (auto s = AddFromJson(sub, steps); !s.ok()) return s;
    }
    return absl::OkStatus();
  } else if (type == "ByteLevel") {
    st.kind = Step::kByteLevel;
  } else if (type == "Metaspace") {
    st.kind = Step::kMetaspace;
    st.a = StringValue(j, "replacement", "\xE2\x96\x81");
    std::string scheme = StringValue(j, "prepend_scheme", "");
    if (scheme.empty()) scheme = BoolValue(j, "add_prefix_space", true) ? "always" : "never";
    st.prepend = scheme != "never";
  } else if (type == "Replace") {
    if (!j.at("pattern").contains("String"))
      return absl::UnimplementedError("Replace decoder with a Regex pattern is not supported");
    st.kind = Step::kReplace;
    st.a = j.at("pattern").at("String").get<std::string>();
    st.b = j.at("content").get<std::string>();
  } else if (type == "ByteFallback") {
    st.kind = Step::kByteFallback;
  } else if (type == "Fuse") {
    st.kind = Step::kFuse;
  } else if (type == "Strip") {
    st.kind = Step::kStrip;
    st.strip_char = StringValue(j, "content", " ");
    // Counts of characters to strip: small non-negative integers (a JSON double or a huge
    // value would be undefined behaviour to narrow).
    for (auto [key, field] : {std::pair{"start", &st.start}, std::pair{"stop", &st.stop}}) {
      const json v = j.value(key, json(0));
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 1024)
        return absl::InvalidArgumentError(absl::StrCat("Strip decoder: \"", key, "\" must be an integer in [0, 1024]"));
      *field = static_cast<int>(v.get<int64_t>());
    }
  } else {
    return absl::UnimplementedError(absl::StrCat("unsupported decoder type '", type, "'"));
  }
  steps.push_back(std::move(st));
  return absl::OkStatus();
}

absl::StatusOr<Decoder> Decoder::FromJson(const json& j) {
  Decoder d;
  if (j.is_null()) return d;
  if (auto s = AddFromJson(j, d.steps_); !s.ok()) return s;
  d.has_decoder_ = true;
  return d;
}

Decoder Decoder::ByteLevel() {
  Decoder d;
  d.steps_.push_back({Step::kByteLevel});
  d.has_decoder_ = true;
  return d;
}

namespace {

// <0xNN> -> NN, else -1.
int ByteTokenValue(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(t[3]), lo = hex(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::vector<std::string> SplitChars(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t b = pos;
    NextCodePoint(s, &pos);
    out.push_back(s.substr(b, pos - b));
  }
  return out;
}

}  // namespace

std::string Decoder::Decode(std::vector<std::string> tokens) const {
  if (!has_decoder_) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i) out += ' ';
      out += tokens[i];
    }
    return out;
  }
  for (const Step& st : steps_) {
    std::vector<std::string> next;
    switch (st.kind) {
      case Step::kByteLevel: {
        std::string bytes;
        for (const std::string& t : tokens) {
          std::string tb;
          bool all = true;
          size_t pos = 0;
          while (pos < t.size()) {
            const int b = UnicodeToByte(NextCodePoint(t, &pos));
            if (b < 0) {
              all = false;
              break;
            }
            tb.push_back(static_cast<char>(b));
          }
          bytes += all ? tb : t;
        }
        next.push_back(Utf8Lossy(bytes));
        break;
      }
      case Step::kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          std::string t;
          size_t at = 0;
          const std::string& s = tokens[i];
          while (at < s.size()) {
            if (!st.a.empty() && s.compare(at, st.a.size(), st.a) == 0) {
              if (!(i == 0 && st.prepend)) t += ' ';
              at += st.a.size();
            } else {
              t += s[at++];
            }
          }
          next.push_back(std::move(t));
        }
        break;
      case Step::kReplace:
        for (const std::string& t : tokens)
          next.push_back(st.a.empty() ? t : absl::StrReplaceAll(t, {{st.a, st.b}}));
        break;
      case Step::kByteFallback: {
        std::string run;
        size_t run_len = 0;
        auto flush = [&] {
          if (run_len == 0) return;
          if (IsValidUtf8(run)) {
            next.push_back(run);
          } else {
            for (size_t k = 0; k < run_len; ++k) next.push_back("\xEF\xBF\xBD");
          }
          run.clear();
          run_len = 0;
        };
        for (std::string& t : tokens) {
          const int b = ByteTokenValue(t);
          if (b >= 0) {
            run.push_back(static_cast<char>(b));
            ++run_len;
          } else {
            flush();
            next.push_back(std::move(t));
          }
        }
        flush();
        break;
      }
      case Step::kFuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        next.push_back(std::move(all));
        break;
      }
      case Step::kStrip:
        for (const std::string& t : tokens) {
          std::vector<std::string> chars = SplitChars(t);
          size_t b = 0, e = chars.size();
          for (int k = 0; k < st.start && b < e && chars[b] == st.strip_char; ++k) ++b;
          for (int k = 0; k < st.stop && e > b && chars[e - 1] == st.strip_char; ++k) --e;
          std::string s;
          for (size_t k = b; k < e; ++k) s += chars[k];
          next.push_back(std::move(s));
        }
        break;
    }
    tokens = std::move(next);
  }
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

}  // namespace defkv::tok
