#include "kernels/device_info.h"

namespace defkv::kernels {

#ifndef DEFKV_WITH_CUDA
bool BuiltWithCuda() { return false; }
std::vector<CudaDevice> ListCudaDevices() { return {}; }
void SynchronizeDevice() {}
int64_t FreeDeviceMemory(int) { return -1; }
bool DependentLaunch(unsigned) { return false; }
void SetDependentLaunch(bool) {}
#else
bool BuiltWithCuda() { return true; }
#endif

}  // namespace defkv::kernels
