// libFuzzer target: config.json and generation_config.json text (split at the first NUL byte).
#include <cstdint>
#include <string>

#include "core/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string all(reinterpret_cast<const char*>(data), size);
  const size_t cut = all.find('\0');
  const std::string config = all.substr(0, cut);
  const std::string gen = cut == std::string::npos ? "" : all.substr(cut + 1);
  (void)defkv::model::ParseModelConfig(config, gen, "fuzz/config.json");
  return 0;
}
