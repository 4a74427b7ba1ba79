// libFuzzer target: arbitrary bytes as tokenizer.json; a loaded tokenizer must then encode and
// decode a fixed text without crashing.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("defkv-fuzz-tok-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream out(dir / "tokenizer.json", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  auto tok = defkv::tok::Tokenizer::Load((dir / "tokenizer.json").string());
  if (tok.ok()) {
    auto ids = (*tok)->Encode("Hello <s> world, caf\xc3\xa9 \xf0\x9f\x98\x80 123\n");
    (void)(*tok)->Decode(ids);
  }
  return 0;
}
