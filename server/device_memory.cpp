#include "server/device_memory.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace defkv::server {
namespace {

std::optional<int64_t> ResidentBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return std::nullopt;
  long size = 0, resident = 0;
  const int n = std::fscanf(f, "%ld %ld", &size, &resident);
  std::fclose(f);
  if (n != 2) return std::nullopt;
  return static_cast<int64_t>(resident) * sysconf(_SC_PAGESIZE);
}

// The three NVML entry points used, looked up once. NVML's ABI for these has been stable since
// the _v2 names were introduced.
struct Nvml {
  struct Memory { unsigned long long total, free, used; };
  using Init = int (*)();
  using HandleByIndex = int (*)(unsigned, void**);
  using MemoryInfo = int (*)(void*, Memory*);
  HandleByIndex handle_by_index = nullptr;
  MemoryInfo memory_info = nullptr;
  bool ok = false;

  Nvml() {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
    auto init = reinterpret_cast<Init>(dlsym(lib, "nvmlInit_v2"));
    handle_by_index = reinterpret_cast<HandleByIndex>(dlsym(lib, "nvmlDeviceGetHandleByIndex_v2"));
    memory_info = reinterpret_cast<MemoryInfo>(dlsym(lib, "nvmlDeviceGetMemoryInfo"));
    ok = init && handle_by_index && memory_info && init() == 0;
  }
};

std::optional<int64_t> GpuUsedBytes(unsigned index) {
  static Nvml nvml;  // thread-safe static init; NVML calls themselves are thread-safe
  if (!nvml.ok) return std::nullopt;
  void* handle = nullptr;
  Nvml::Memory mem{};
  if (nvml.handle_by_index(index, &handle) != 0 || nvml.memory_info(handle, &mem) != 0) return std::nullopt;
  return static_cast<int64_t>(mem.used);
}

}  // namespace

std::optional<int64_t> DeviceMemoryUsedBytes(const std::string& device) {
  if (device.rfind("cuda", 0) == 0) {
    const auto colon = device.find(':');
    const unsigned index = colon == std::string::npos ? 0 : static_cast<unsigned>(std::atoi(device.c_str() + colon + 1));
    return GpuUsedBytes(index);
  }
  return ResidentBytes();
}

}  // namespace defkv::server
