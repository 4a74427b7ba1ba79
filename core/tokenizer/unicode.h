// UTF-8 and Unicode helpers shared by the tokenizers: code point iteration, the lossy decoding
// HF uses when bytes are not valid UTF-8, NFC, and GPT-2's byte <-> printable-char mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace defkv::tok {

// Length of the UTF-8 sequence a lead byte announces (1 for an invalid lead byte).
size_t Utf8SeqLen(unsigned char lead);

// Reads the code point at s[*pos] and advances *pos; invalid bytes read as U+FFFD, one each.
char32_t NextCodePoint(std::string_view s, size_t* pos);

void AppendUtf8(std::string& out, char32_t cp);

// Unicode White_Space, which is what Rust's char::is_whitespace tests.
bool IsUnicodeWhitespace(char32_t cp);

bool IsValidUtf8(std::string_view s);

// Like Rust's String::from_utf8_lossy: each maximal ill-formed subsequence becomes one U+FFFD.
std::string Utf8Lossy(std::string_view bytes);

// Length of the longest prefix of s that does not end inside an unfinished UTF-8 sequence.
// An ill-formed byte counts as finished (it will print as U+FFFD whatever follows).
size_t CompleteUtf8Prefix(std::string_view s);

// Unicode Normalization Form C (through ICU).
std::string NfcNormalize(std::string_view s);

// GPT-2 byte-level alphabet: every byte maps to one printable code point, as UTF-8.
const std::string& ByteToUnicode(uint8_t b);
// Inverse of ByteToUnicode for one code point; -1 when it is not in the alphabet.
int UnicodeToByte(char32_t cp);

}  // namespace defkv::tok
