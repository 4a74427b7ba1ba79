// Unit tests of the tokenizer module: UTF-8 helpers, incremental decoding, byte fallback,
// added-token splitting and load errors. HF parity over many strings is in
// tests/python/test_tokenizers.py.
#include "core/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>

#include "core/tokenizer/unicode.h"
#include "tests/unit/testdata.h"

namespace defkv::tok {
namespace {

namespace fs = std::filesystem;

std::string Data(const std::string& rel) { return ::defkv::testing::TestdataDir() + "/" + rel; }

std::unique_ptr<Tokenizer> MustLoad(const std::string& path) {
  auto t = Tokenizer::Load(path);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

fs::path TempDir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("defkv_tok_test_" + name + "_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

void WriteFile(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

TEST(Utf8, LossyReplacesMaximalSubparts) {
  EXPECT_EQ(Utf8Lossy("a\xE6\x97"), "a\xEF\xBF\xBD");          // truncated 3-byte: one U+FFFD
  EXPECT_EQ(Utf8Lossy("\xC0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong: two
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(Utf8Lossy("ok \xF0\x9F\x98\x80"), "ok \xF0\x9F\x98\x80");
}

TEST(Utf8, CompletePrefixStopsBeforeUnfinishedSequence) {
  const std::string smile = "\xF0\x9F\x98\x80";
  for (size_t k = 1; k < 4; ++k) EXPECT_EQ(CompleteUtf8Prefix("ab" + smile.substr(0, k)), 2u);
  EXPECT_EQ(CompleteUtf8Prefix("ab" + smile), 6u);
  EXPECT_EQ(CompleteUtf8Prefix("\x80"), 1u);  // stray continuation is final (prints as U+FFFD)
}

TEST(Utf8, NfcComposes) {
  EXPECT_EQ(NfcNormalize("e\xCC\x81"), "\xC3\xA9");              // e + U+0301 -> é
  EXPECT_EQ(NfcNormalize("\xE2\x84\xAB"), "\xC3\x85");           // Angstrom sign -> Å
  EXPECT_EQ(NfcNormalize("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // jamo -> 각
  EXPECT_EQ(NfcNormalize("plain ascii"), "plain ascii");
}

TEST(ByteLevel, TableRoundTrips) {
  for (int b = 0; b < 256; ++b) {
    const std::string& s = ByteToUnicode(static_cast<uint8_t>(b));
    size_t pos = 0;
    EXPECT_EQ(UnicodeToByte(NextCodePoint(s, &pos)), b);
  }
  EXPECT_EQ(ByteToUnicode(' '), "\xC4\xA0");  // Ġ
}

TEST(Tokenizer, ByteFallbackSpellsUnknownCharacters) {
  DEFKV_REQUIRE_TESTDATA();
  auto tok = MustLoad(Data("models/stories260K/hf"));
  ASSERT_TRUE(tok);
  const std::string text = "a \xE6\x97\xA5";  // "a 日": 日 is not in the 512-piece vocab
  const auto ids = tok->Encode(text);
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(tok->IdToToken(id));
  ASSERT_GE(pieces.size(), 3u);
  EXPECT_EQ(pieces[pieces.size() - 3], "<0xE6>");
  EXPECT_EQ(pieces[pieces.size() - 2], "<0x97>");
  EXPECT_EQ(pieces.back(), "<0xA5>");
  EXPECT_EQ(tok->Decode(ids), text);
  // A byte run that is not valid UTF-8 decodes to one U+FFFD per byte, as HF's ByteFallback.
  EXPECT_EQ(tok->Decode({*tok->TokenToId("<0xE6>"), *tok->TokenToId("<0x97>")}),
            "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Tokenizer, AddedTokensSplitOnlyWhenParsingSpecials) {
  DEFKV_REQUIRE_TESTDATA();
  auto tok = MustLoad(Data("tokenizers/llama3-hf"));
  ASSERT_TRUE(tok);
  const int32_t eot = *tok->TokenToId("<|eot_id|>");
  EXPECT_EQ(eot, 128009);
  EXPECT_TRUE(tok->IsSpecial(eot));
  const auto with = tok->Encode("hi<|eot_id|>there", true);
  EXPECT_NE(std::find(with.begin(), with.end(), eot), with.end());
  const auto without = tok->Encode("hi<|eot_id|>there", false);
  EXPECT_EQ(std::find(without.begin(), without.end(), eot), without.end());
  EXPECT_EQ(tok->Decode(without), "hi<|eot_id|>there");
  EXPECT_EQ(tok->Decode(with, /*skip_special=*/true), "hithere");
  EXPECT_EQ(tok->bos_id(), 128000);
  EXPECT_EQ(tok->eos_id(), 128001);
  EXPECT_EQ(tok->vocab_size(), 128256);
  EXPECT_TRUE(tok->lossless());
}

TEST(Tokenizer, AddedTokenStripFlags) {
  // A tiny hand-written tokenizer.json: characters only, one added token that eats the
  // whitespace on both sides.
  const fs::path dir = TempDir("strip");
  WriteFile(dir / "tokenizer.json", R"({
    "added_tokens": [{"id": 3, "content": "<X>", "lstrip": true, "rstrip": true,
                      "normalized": false, "special": true, "single_word": false}],
    "normalizer": null, "pre_tokenizer": null, "decoder": null,
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, " ": 2}, "merges": []}})");
  auto tok = MustLoad(dir.string());
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Encode("a  <X>  b"), (std::vector<int32_t>{0, 3, 1}));
  EXPECT_EQ(tok->Encode("a <X>b<X>"), (std::vector<int32_t>{0, 3, 1, 3}));
  fs::remove_all(dir);
}

TEST(Tokenizer, InvalidUtf8InputIsRepairedNotFatal) {
  DEFKV_REQUIRE_TESTDATA();
  auto tok = MustLoad(Data("tokenizers/qwen3-hf"));
  ASSERT_TRUE(tok);
  const auto ids = tok->Encode("ab\xFF\xE6\x97");
  EXPECT_EQ(tok->Decode(ids), "ab\xEF\xBF\xBD\xEF\xBF\xBD");
}

// Every Push output must be whole UTF-8, and all outputs together must equal Decode.
void ExpectStreamsLikeDecode(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  IncrementalDecoder dec(tok, /*skip_special=*/false);
  std::string all;
  for (int32_t id : ids) {
    const std::string piece = dec.Push(id);
    EXPECT_TRUE(IsValidUtf8(piece));
    all += piece;
  }
  const std::string rest = dec.Flush();
  EXPECT_TRUE(IsValidUtf8(rest));
  all += rest;
  EXPECT_EQ(all, tok.Decode(ids, false));
}

TEST(IncrementalDecoder, ByteLevelEmojiSplitIntoBytes) {
  DEFKV_REQUIRE_TESTDATA();
  auto tok = MustLoad(Data("tokenizers/llama3-hf"));
  ASSERT_TRUE(tok);
  // "x👨‍👩‍👧 日" spelled one byte-level token per byte.
  const std::string text = "x\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9 \xE6\x97\xA5";
  std::vector<int32_t> ids;
  for (unsigned char b : text) ids.push_back(*tok->TokenToId(ByteToUnicode(b)));
  IncrementalDecoder dec(*tok);
  std::vector<std::string> outs;
  for (int32_t id : ids) outs.push_back(dec.Push(id));
  EXPECT_EQ(outs[0], "x");
  EXPECT_EQ(outs[1], "");  // first byte of 👨: held back
  EXPECT_EQ(outs[4], "\xF0\x9F\x91\xA8");
  ExpectStreamsLikeDecode(*tok, ids);
  ExpectStreamsLikeDecode(*tok, tok->Encode(text));
}

TEST(IncrementalDecoder, ByteFallbackAndSpacing) {
  DEFKV_REQUIRE_TESTDATA();
  for (const char* rel : {"models/stories260K/hf", "tokenizers/llama2/tokenizer.model",
                          "tokenizers/mistral/tokenizer.model.v3"}) {
    auto tok = MustLoad(Data(rel));
    ASSERT_TRUE(tok);
    for (const char* text : {"Once upon a time, \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80!",
                             "  two  spaces", "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBF end"}) {
      SCOPED_TRACE(std::string(rel) + ": " + text);
      ExpectStreamsLikeDecode(*tok, tok->Encode(text));
    }
  }
}

TEST(IncrementalDecoder, RandomIdStreams) {
  DEFKV_REQUIRE_TESTDATA();
  std::mt19937 rng(42);
  for (const char* rel : {"tokenizers/qwen3-hf", "models/stories260K/hf",
                          "tokenizers/mistral/tokenizer.model.v1"}) {
    auto tok = MustLoad(Data(rel));
    ASSERT_TRUE(tok);
    std::uniform_int_distribution<int32_t> any(0, tok->vocab_size() - 1);
    for (int n = 0; n < 100; ++n) {
      std::vector<int32_t> ids(1 + rng() % 40);
      for (auto& id : ids) id = any(rng);
      ExpectStreamsLikeDecode(*tok, ids);
    }
  }
}

TEST(Tokenizer, Encodes100KbQuickly) {
  DEFKV_REQUIRE_TESTDATA();
  auto tok = MustLoad(Data("tokenizers/llama3-hf"));
  ASSERT_TRUE(tok);
  std::mt19937 rng(1);
  const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog,",
                         "tokenizer", "inference", "12345", "\xE6\x97\xA5\xE6\x9C\xAC",
                         "\xF0\x9F\x98\x80", "\n\n", "supercalifragilistic"};
  std::string text;
  while (text.size() < 100000) text += std::string(words[rng() % 15]) + " ";
  text += std::string(20000, 'a');  // one long pre-token exercises the merge loop
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok->Encode(text);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_FALSE(ids.empty());
  EXPECT_LT(s, 1.0);
  EXPECT_EQ(tok->Decode(ids), text);
}

// ---- load errors ----

void ExpectLoadErrorNaming(const std::string& path, const std::string& what) {
  auto t = Tokenizer::Load(path);
  ASSERT_FALSE(t.ok()) << what;
  EXPECT_NE(std::string(t.status().message()).find(path), std::string::npos)
      << what << ": " << t.status();
}

TEST(LoadErrors, MissingFile) {
  ExpectLoadErrorNaming("/nonexistent/dir/tokenizer.json", "missing file");
}

TEST(LoadErrors, EmptyDirectory) {
  const fs::path dir = TempDir("empty");
  ExpectLoadErrorNaming(dir.string(), "empty dir");
  fs::remove_all(dir);
}

TEST(LoadErrors, CorruptJson) {
  const fs::path dir = TempDir("corrupt");
  WriteFile(dir / "tokenizer.json", "{\"model\": {\"type\": \"BPE\", ");
  ExpectLoadErrorNaming((dir / "tokenizer.json").string(), "corrupt json");
  WriteFile(dir / "tokenizer.json", "[1, 2, 3]");
  ExpectLoadErrorNaming((dir / "tokenizer.json").string(), "json of the wrong shape");
  fs::remove_all(dir);
}

TEST(LoadErrors, UnknownModelAndComponentTypes) {
  const fs::path dir = TempDir("unknown");
  const fs::path p = dir / "tokenizer.json";
  WriteFile(p, R"({"model": {"type": "WordPiece", "vocab": {}}})");
  ExpectLoadErrorNaming(p.string(), "WordPiece");
  WriteFile(p, R"({"normalizer": {"type": "Lowercase"},
                   "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  ExpectLoadErrorNaming(p.string(), "unknown normalizer");
  WriteFile(p, R"({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"},
                   "behavior": "Isolated"},
                   "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  ExpectLoadErrorNaming(p.string(), "bad regex");
  fs::remove_all(dir);
}

TEST(LoadErrors, CorruptSentencePieceModel) {
  const fs::path dir = TempDir("spm");
  WriteFile(dir / "tokenizer.model", std::string("\x0a\x05garbage-not-a-model\xff\xff", 24));
  ExpectLoadErrorNaming((dir / "tokenizer.model").string(), "corrupt .model");
  fs::remove_all(dir);
}

TEST(LoadErrors, CorruptTokenizerConfig) {
  DEFKV_REQUIRE_TESTDATA();
  const fs::path dir = TempDir("config");
  fs::copy_file(Data("models/stories260K/hf/tokenizer.json"), dir / "tokenizer.json",
                fs::copy_options::overwrite_existing);
  WriteFile(dir / "tokenizer_config.json", "{oops");
  ExpectLoadErrorNaming((dir / "tokenizer_config.json").string(), "corrupt config");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace defkv::tok

// Inputs the fuzzers (tests/fuzz) found crashing, kept as regressions: each must load or fail
// with a status naming the file, never crash.
TEST(FuzzRegressions, TokenizerJsonInputsFail) {
  const std::filesystem::path dir = std::filesystem::path(DEFKV_SOURCE_DIR) / "tests/fuzz/regressions/tokenizer_load";
  int seen = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::filesystem::path tmp = std::filesystem::temp_directory_path() / "defkv-regression-tokenizer.json";
    std::filesystem::copy_file(entry.path(), tmp, std::filesystem::copy_options::overwrite_existing);
    auto tok = defkv::tok::Tokenizer::Load(tmp.string());
    if (!tok.ok()) {
      EXPECT_NE(tok.status().message().find(tmp.string()), std::string::npos) << tok.status();
    }
    ++seen;
  }
  EXPECT_GT(seen, 0);
}
