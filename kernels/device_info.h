// What the CUDA side of this build sees: compiled in or not, and the devices present. Used in
// startup logs and GetModelInfo; safe to call on a machine with no GPU.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace defkv::kernels {

struct CudaDevice {
  int index = 0;
  std::string name;
  int sm_major = 0, sm_minor = 0;
  size_t total_memory = 0;
};

bool BuiltWithCuda();
// Empty when the build has no CUDA or the machine has no usable GPU.
std::vector<CudaDevice> ListCudaDevices();
// Waits for all queued GPU work (timing boundaries); nothing without CUDA.
void SynchronizeDevice();
// Free memory of a CUDA device in bytes (cudaMemGetInfo), -1 without CUDA.
int64_t FreeDeviceMemory(int device);
// Whether defkv's kernels of `kind` (kernels/launch.cuh's kPdl* bits; the default: any) launch
// with programmatic dependent launch: a CUDA build on an sm_90 or newer device, unless the
// environment says otherwise when first asked. DEFKV_PDL=0: none; unset or 1: all; any other
// number: a mask of kPdl* bits (diagnosis: which kernels take part).
bool DependentLaunch(unsigned kind = ~0u);
// Turns it on (the kinds the environment allows, where the device takes it) or off for the
// process; for tests and benchmarks that compare both in one run.
void SetDependentLaunch(bool on);

}  // namespace defkv::kernels
