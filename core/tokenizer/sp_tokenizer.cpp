#include "core/tokenizer/sp_tokenizer.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/container/flat_hash_map.h"
#include "core/tokenizer/hf_tokenizer.h"
#include "core/tokenizer/load_util.h"
#include "core/tokenizer/unicode.h"
#include "core/tokenizer/pipeline_tokenizer.h"
#include "core/tokenizer/sp_backend.h"

namespace defkv::tok {

namespace {

constexpr const char* kMeta = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

// Protobuf wire-format helpers, just enough to flip one field of the serialized ModelProto.
bool ReadVarint(const std::string& s, size_t* pos, uint64_t* v) {
  *v = 0;
  for (int shift = 0; shift < 64 && *pos < s.size(); shift += 7) {
    const auto b = static_cast<unsigned char>(s[(*pos)++]);
    *v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}

void WriteVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

// Returns the model with normalizer_spec.add_dummy_prefix = false. transformers' converted
// tokenizer decides where "▁" goes itself (Metaspace, prepend_scheme "first"), so the library
// must not add its own. Appending the field to the sub-message overrides any earlier value.
std::optional<std::string> WithoutDummyPrefix(const std::string& model) {
  constexpr uint64_t kNormalizerSpecTag = (3 << 3) | 2;  // field 3, length-delimited
  std::string out;
  out.reserve(model.size() + 8);
  size_t pos = 0;
  bool patched = false;
  while (pos < model.size()) {
    const size_t field_start = pos;
    uint64_t tag;
    if (!ReadVarint(model, &pos, &tag)) return std::nullopt;
    switch (tag & 7) {
      case 0: {
        uint64_t v;
        if (!ReadVarint(model, &pos, &v)) return std::nullopt;
        break;
      }
      case 1: pos += 8; break;
      case 5: pos += 4; break;
      case 2: {
        uint64_t len;
        if (!ReadVarint(model, &pos, &len) || pos + len > model.size()) return std::nullopt;
        if (tag == kNormalizerSpecTag) {
          std::string body = model.substr(pos, len);
          body += '\x18';  // field 3 (add_dummy_prefix), varint
          body += '\x00';
          WriteVarint(out, tag);
          WriteVarint(out, body.size());
          out += body;
          pos += len;
          patched = true;
          continue;
        }
        pos += len;
        break;
      }
      default: return std::nullopt;
    }
    if (pos > model.size()) return std::nullopt;
    out.append(model, field_start, pos - field_start);
  }
  if (!patched) return std::nullopt;
  return out;
}

// Piece types from ModelProto.pieces (field 1; in each, field 3 is the type, NORMAL when
// absent). The library version in Debian cannot report user-defined pieces, so read them here.
enum PieceType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4 };

struct ProtoInfo {
  std::vector<int> types;
  int model_type = 1;  // TrainerSpec.model_type: UNIGRAM (1) when absent, BPE is 2
};

std::optional<int> ModelType(const std::string& trainer_spec) {
  int type = 1;
  size_t p = 0;
  while (p < trainer_spec.size()) {
    uint64_t t, v = 0;
    if (!ReadVarint(trainer_spec, &p, &t)) return std::nullopt;
    switch (t & 7) {
      case 0:
        if (!ReadVarint(trainer_spec, &p, &v)) return std::nullopt;
        if (t >> 3 == 3) type = static_cast<int>(v);
        break;
      case 1: p += 8; break;
      case 5: p += 4; break;
      case 2:
        if (!ReadVarint(trainer_spec, &p, &v)) return std::nullopt;
        p += v;
        break;
      default: return std::nullopt;
    }
  }
  return type;
}

std::optional<ProtoInfo> ParseProto(const std::string& model) {
  ProtoInfo info;
  std::vector<int>& types = info.types;
  size_t pos = 0;
  while (pos < model.size()) {
    uint64_t tag, len = 0;
    if (!ReadVarint(model, &pos, &tag)) return std::nullopt;
    switch (tag & 7) {
      case 0: if (!ReadVarint(model, &pos, &len)) return std::nullopt; continue;
      case 1: pos += 8; continue;
      case 5: pos += 4; continue;
      case 2: if (!ReadVarint(model, &pos, &len) || pos + len > model.size()) return std::nullopt; break;
      default: return std::nullopt;
    }
    if (tag == ((2 << 3) | 2)) {
      auto mt = ModelType(model.substr(pos, len));
      if (!mt) return std::nullopt;
      info.model_type = *mt;
    }
    if (tag == ((1 << 3) | 2)) {
      int type = kNormal;
      const std::string piece = model.substr(pos, len);
      size_t p = 0;
      while (p < piece.size()) {
        uint64_t t, v = 0;
        if (!ReadVarint(piece, &p, &t)) return std::nullopt;
        if ((t & 7) == 0) {
          if (!ReadVarint(piece, &p, &v)) return std::nullopt;
          if (t >> 3 == 3) type = static_cast<int>(v);
        } else if ((t & 7) == 2) {
          if (!ReadVarint(piece, &p, &v)) return std::nullopt;
          p += v;
        } else if ((t & 7) == 5) {
          p += 4;
        } else if ((t & 7) == 1) {
          p += 8;
        } else {
          return std::nullopt;
        }
      }
      types.push_back(type);
    }
    pos += len;
  }
  return info;
}

class SpTokenizer : public PipelineTokenizer {
 public:
  absl::Status Load(const std::string& path, const nlohmann::json& config) {
    auto bytes = ReadFileBytes(path);
    if (!bytes.ok()) return bytes.status();
    auto patched = WithoutDummyPrefix(*bytes);
    if (!patched)
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a SentencePiece model"));
    if (auto err = sp_.LoadFromSerialized(*patched); !err.empty())
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", err));
    // transformers turns unknown, control and user-defined pieces into added tokens; only
    // user-defined ones are not special.
    auto info = ParseProto(*bytes);
    if (!info || static_cast<int>(info->types.size()) != sp_.piece_size())
      return absl::InvalidArgumentError(absl::StrCat(path, ": cannot read the piece table"));
    const std::vector<int>* types = &info->types;
    for (int id = 0; id < sp_.piece_size(); ++id) {
      const int type = (*types)[id];
      const bool user = type == kUserDefined;
      if (!(type == kUnknown || type == kControl || user)) continue;
      AddedToken t;
      t.id = id;
      t.content = sp_.IdToPiece(id);
      t.special = !user;
      added_.Add(t);
    }
    auto dec = Decoder::FromJson(nlohmann::json::parse(R"({"type":"Sequence","decoders":[
        {"type":"Replace","pattern":{"String":"\u2581"},"content":" "},
        {"type":"ByteFallback"},{"type":"Fuse"},
        {"type":"Strip","content":" ","start":1,"stop":0}]})"));
    if (!dec.ok()) return dec.status();
    decoder_ = std::move(*dec);
    if (sp_.bos_id() >= 0) bos_id_ = sp_.bos_id();
    if (sp_.eos_id() >= 0) eos_id_ = sp_.eos_id();
    if (auto b = TokenContent(config, "bos_token")) bos_id_ = TokenToId(*b);
    if (auto e = TokenContent(config, "eos_token")) eos_id_ = TokenToId(*e);
    describe_ = absl::StrCat("SentencePiece model (libsentencepiece), ", sp_.piece_size());
    // Leading spaces of the input are not kept (prepend_scheme "first"), so not lossless.
    lossless_ = false;
    return absl::OkStatus();
  }

 protected:
  void EncodeText(std::string_view text, bool first, std::vector<int32_t>& out) const override {
    std::string t = absl::StrReplaceAll(absl::string_view(text.data(), text.size()), {{" ", kMeta}});
    if (first && t.rfind(kMeta, 0) != 0) t.insert(0, kMeta);
    std::vector<int> ids;
    if (!sp_.Encode(t, &ids)) return;
    out.insert(out.end(), ids.begin(), ids.end());
  }
  std::optional<int32_t> ModelTokenToId(std::string_view token) const override {
    const int id = sp_.PieceToId(token);
    if (id == sp_.unk_id() && token != sp_.IdToPiece(id)) return std::nullopt;
    return id;
  }
  std::string ModelIdToToken(int32_t id) const override {
    if (id < 0 || id >= sp_.piece_size()) return "";
    return sp_.IdToPiece(id);
  }
  int32_t ModelMaxId() const override { return sp_.piece_size() - 1; }

 private:
  SpBackend sp_;
};


// transformers' conversion of a BPE .model (its SentencePieceExtractor, legacy=False): every
// piece is in the vocab; a merge exists for each split of a piece into two vocab pieces,
// ordered by the merged piece's id, then by the left part's length.
nlohmann::json ConvertBpeModel(const SpBackend& sp, const std::vector<int>& types) {
  using nlohmann::json;
  absl::flat_hash_map<std::string, int> ids;
  json vocab = json::object();
  std::vector<std::string> pieces(types.size());
  for (int id = 0; id < static_cast<int>(types.size()); ++id) {
    pieces[id] = sp.IdToPiece(id);
    ids[pieces[id]] = id;
    vocab[pieces[id]] = id;
  }
  json merges = json::array();
  bool has_bytes = false;
  for (int id = 0; id < static_cast<int>(pieces.size()); ++id) {
    const std::string& p = pieces[id];
    has_bytes = has_bytes || types[id] == 6;
    for (size_t cut = Utf8SeqLen(static_cast<unsigned char>(p[0])); cut < p.size();
         cut += Utf8SeqLen(static_cast<unsigned char>(p[cut]))) {
      const std::string l = p.substr(0, cut), r = p.substr(cut);
      if (ids.contains(l) && ids.contains(r)) merges.push_back(json::array({l, r}));
    }
  }
  json added = json::array();
  for (int id = 0; id < static_cast<int>(types.size()); ++id) {
    const int t = types[id];
    if (t != kUnknown && t != kControl && t != kUserDefined) continue;
    added.push_back({{"id", id}, {"content", pieces[id]}, {"special", t != kUserDefined},
                     {"normalized", false}, {"lstrip", false}, {"rstrip", false},
                     {"single_word", false}});
  }
  return json{
      {"model", {{"type", "BPE"}, {"vocab", std::move(vocab)}, {"merges", std::move(merges)},
                 {"byte_fallback", has_bytes}, {"fuse_unk", true}, {"unk_token", nullptr}}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", "first"},
        {"split", false}}},
      {"decoder", json::parse(R"({"type":"Sequence","decoders":[
          {"type":"Replace","pattern":{"String":"\u2581"},"content":" "},
          {"type":"ByteFallback"},{"type":"Fuse"},
          {"type":"Strip","content":" ","start":1,"stop":0}]})")},
      {"added_tokens", std::move(added)}};
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& path,
                                                             const std::string& config_path) {
  nlohmann::json config = nlohmann::json::object();
  if (!config_path.empty()) {
    auto c = ReadJsonFile(config_path);
    if (!c.ok()) return c.status();
    config = std::move(*c);
  }
  auto bytes = ReadFileBytes(path);
  if (!bytes.ok()) return bytes.status();
  auto info = ParseProto(*bytes);
  SpBackend sp;
  if (auto err = sp.LoadFromSerialized(*bytes); !err.empty() || !info)
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a valid SentencePiece model", err.empty() ? "" : ": ", err));
  if (static_cast<int>(info->types.size()) != sp.piece_size())
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot read the piece table"));
  if (info->model_type == 2) {
    // BPE models are encoded with the merges transformers derives from them: libsentencepiece
    // itself splits before every "\u2581", which tokenizes runs of spaces differently.
    if (!config.contains("bos_token") && sp.bos_id() >= 0) config["bos_token"] = sp.IdToPiece(sp.bos_id());
    if (!config.contains("eos_token") && sp.eos_id() >= 0) config["eos_token"] = sp.IdToPiece(sp.eos_id());
    return TokenizerFromJson(ConvertBpeModel(sp, info->types), config, path, "SentencePiece .model");
  }
  auto tok = std::make_unique<SpTokenizer>();
  if (auto st = tok->Load(path, config); !st.ok()) return st;
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace defkv::tok
