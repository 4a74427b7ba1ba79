// libFuzzer target: arbitrary bytes as a safetensors file. Any input must give a tensor map or
// a status, never a crash or a read outside the buffer (ASan checks the latter).
#include <cstdint>
#include <string>

#include "core/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = defkv::model::SafetensorsFile::FromBuffer(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (f.ok())
    for (const auto& [name, t] : (*f)->tensors()) {
      volatile uint8_t sink = 0;
      if (t.nbytes > 0) sink = t.data[t.nbytes - 1];  // every view must lie inside the buffer
      (void)sink;
    }
  return 0;
}
