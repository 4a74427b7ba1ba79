#include "core/tokenizer/unicode.h"

#include <array>
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <unordered_map>

namespace defkv::tok {

size_t Utf8SeqLen(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 1;
}

namespace {

// Allowed range of the second byte of a sequence, per the Unicode well-formedness table; the
// narrow ranges after E0/ED/F0/F4 rule out overlongs, surrogates and values above U+10FFFF.
bool SecondByteOk(unsigned char lead, unsigned char b) {
  switch (lead) {
    case 0xE0: return b >= 0xA0 && b <= 0xBF;
    case 0xED: return b >= 0x80 && b <= 0x9F;
    case 0xF0: return b >= 0x90 && b <= 0xBF;
    case 0xF4: return b >= 0x80 && b <= 0x8F;
    default: return b >= 0x80 && b <= 0xBF;
  }
}

// Scans one sequence at s[pos]: returns how many bytes it spans and whether it is complete and
// valid. An invalid or truncated sequence spans its maximal well-formed prefix (at least 1).
struct Scan {
  size_t len;
  bool valid;
  bool truncated;  // ran out of input while still well formed
};

Scan ScanSeq(std::string_view s, size_t pos) {
  const auto lead = static_cast<unsigned char>(s[pos]);
  const size_t need = Utf8SeqLen(lead);
  if (lead < 0x80) return {1, true, false};
  if (need == 1) return {1, false, false};
  size_t i = 1;
  while (i < need) {
    if (pos + i >= s.size()) return {i, false, true};
    const auto b = static_cast<unsigned char>(s[pos + i]);
    const bool ok = i == 1 ? SecondByteOk(lead, b) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {i, false, false};
    ++i;
  }
  return {need, true, false};
}

}  // namespace

char32_t NextCodePoint(std::string_view s, size_t* pos) {
  const Scan sc = ScanSeq(s, *pos);
  const auto* p = reinterpret_cast<const unsigned char*>(s.data() + *pos);
  *pos += sc.len;
  if (!sc.valid) return 0xFFFD;
  switch (sc.len) {
    case 1: return p[0];
    case 2: return ((p[0] & 0x1F) << 6) | (p[1] & 0x3F);
    case 3: return ((p[0] & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    default:
      return ((p[0] & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F);
  }
}

void AppendUtf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsUnicodeWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

bool IsValidUtf8(std::string_view s) {
  for (size_t pos = 0; pos < s.size();) {
    const Scan sc = ScanSeq(s, pos);
    if (!sc.valid) return false;
    pos += sc.len;
  }
  return true;
}

std::string Utf8Lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (pos < s.size()) {
    const Scan sc = ScanSeq(s, pos);
    if (sc.valid) {
      out.append(s.substr(pos, sc.len));
    } else {
      out.append("\xEF\xBF\xBD");
    }
    pos += sc.len;
  }
  return out;
}

size_t CompleteUtf8Prefix(std::string_view s) {
  // Only the last (at most 3) bytes can start an unfinished sequence.
  const size_t from = s.size() > 3 ? s.size() - 3 : 0;
  for (size_t start = from; start < s.size(); ++start) {
    const auto b = static_cast<unsigned char>(s[start]);
    if (b >= 0x80 && b <= 0xBF) continue;  // continuation byte: not a start
    const Scan sc = ScanSeq(s, start);
    if (sc.truncated) return start;
  }
  return s.size();
}

std::string NfcNormalize(std::string_view s) {
  // Below U+0300 every character is NFC-stable and does not combine (NFC_Quick_Check=Yes and
  // canonical combining class 0), so such text needs no ICU round trip.
  bool simple = true;
  for (unsigned char c : s) {
    if (c >= 0xCC) {
      simple = false;
      break;
    }
  }
  if (simple) return std::string(s);
  UErrorCode err = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(err);
  if (U_FAILURE(err)) return std::string(s);
  icu::UnicodeString in = icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), s.size()));
  icu::UnicodeString norm = nfc->normalize(in, err);
  if (U_FAILURE(err)) return std::string(s);
  std::string out;
  norm.toUTF8String(out);
  return out;
}

namespace {

struct ByteTables {
  std::array<std::string, 256> to_unicode;
  std::unordered_map<char32_t, int> to_byte;
  ByteTables() {
    // GPT-2 keeps printable Latin-1 bytes as themselves and moves the rest to U+0100 onwards,
    // in byte order, so every byte becomes a visible character.
    int shifted = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) ||
                             (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : 0x100 + shifted++;
      AppendUtf8(to_unicode[b], cp);
      to_byte[cp] = b;
    }
  }
};

const ByteTables& Tables() {
  static const ByteTables t;
  return t;
}

}  // namespace

const std::string& ByteToUnicode(uint8_t b) { return Tables().to_unicode[b]; }

int UnicodeToByte(char32_t cp) {
  const auto& m = Tables().to_byte;
  auto it = m.find(cp);
  return it == m.end() ? -1 : it->second;
}

}  // namespace defkv::tok
