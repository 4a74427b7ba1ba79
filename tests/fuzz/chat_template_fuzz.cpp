// libFuzzer target: arbitrary bytes as tokenizer_config.json (its chat_template chooses the
// format), then rendering messages built from the same bytes.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("defkv-fuzz-chat-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream out(dir / "tokenizer_config.json", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  auto chat = defkv::tok::ChatTemplate::FromModelDir(dir.string());
  if (!chat.ok()) return 0;
  const std::string s(reinterpret_cast<const char*>(data), size);
  static const char* kRoles[] = {"system", "user", "assistant", "tool"};
  std::vector<defkv::tok::ChatMessage> msgs;
  for (size_t i = 0; i < s.size() && msgs.size() < 6; i += 37)
    msgs.push_back({kRoles[static_cast<uint8_t>(s[i]) % 4], s.substr(i, 37)});
  for (bool gen : {true, false})
    for (bool think : {true, false}) (void)chat->Render(msgs, gen, think);
  return 0;
}
