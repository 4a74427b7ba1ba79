// Memory in use on the serving device, for the defkv_device_memory_used_bytes gauge.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace defkv::server {

// "cpu": this process's resident set size. "cuda[:N]": used memory of GPU N as NVML reports it
// (libnvidia-ml is opened at run time, so the server needs no CUDA to build). nullopt when
// the number cannot be read.
std::optional<int64_t> DeviceMemoryUsedBytes(const std::string& device);

}  // namespace defkv::server
