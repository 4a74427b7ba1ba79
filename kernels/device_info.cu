// The CUDA half of device_info.h: device enumeration through the runtime API. Compiled by nvcc
// for sm_90 when DEFKV_CUDA=ON; a machine without a GPU gets an empty list, not an error.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>

#include "kernels/device_info.h"

namespace defkv::kernels {

std::vector<CudaDevice> ListCudaDevices() {
  std::vector<CudaDevice> out;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    out.push_back({i, prop.name, prop.major, prop.minor, prop.totalGlobalMem});
  }
  return out;
}

int64_t FreeDeviceMemory(int device) {
  int previous = 0;
  size_t free_bytes = 0, total = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) return -1;
  const bool ok = cudaMemGetInfo(&free_bytes, &total) == cudaSuccess;
  cudaSetDevice(previous);
  return ok ? static_cast<int64_t>(free_bytes) : -1;
}

void SynchronizeDevice() {
  if (cudaDeviceSynchronize() != cudaSuccess) cudaGetLastError();
}

namespace {
// The kinds of kernel (launch.cuh's kPdl* bits) that DEFKV_PDL allows, read once; 0 on a device
// below sm_90 or without one.
unsigned ConfiguredMask() {
  static const unsigned mask = [] {
    const char* v = std::getenv("DEFKV_PDL");
    const unsigned m = v == nullptr || *v == 0 ? 1u : static_cast<unsigned>(std::strtoul(v, nullptr, 0));
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      return 0u;
    }
    return major < 9 ? 0u : m == 1 ? ~0u : m;
  }();
  return mask;
}
// The kinds launched that way now: the configured ones, or none after SetDependentLaunch(false).
std::atomic<unsigned>& CurrentMask() {
  static std::atomic<unsigned> mask{ConfiguredMask()};
  return mask;
}
}  // namespace

bool DependentLaunch(unsigned kind) { return (CurrentMask().load() & kind) != 0; }

void SetDependentLaunch(bool on) { CurrentMask().store(on ? ConfiguredMask() : 0u); }

}  // namespace defkv::kernels
