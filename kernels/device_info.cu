// The CUDA half of device_info.h: device enumeration through the runtime API. Compiled by nvcc
// for sm_90 when DEFKV_CUDA=ON; a machine without a GPU gets an empty list, not an error.
#include <cuda_runtime.h>

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

}  // namespace defkv::kernels
