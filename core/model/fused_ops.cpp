#include "core/model/fused_ops.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>

#ifdef DEFKV_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/norm_rope.h"
#endif

namespace defkv::model {
namespace {

std::atomic<bool>& Switch() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("DEFKV_FUSED_KERNELS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }()};
  return on;
}

#ifdef DEFKV_WITH_CUDA
std::optional<kernels::DType> KernelDType(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default: return std::nullopt;
  }
}

bool Covered(const at::Tensor& x) {
  return x.defined() && x.is_cuda() && FusedKernelsEnabled() && KernelDType(x.scalar_type()).has_value();
}

bool Matches(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef sizes) {
  return t.defined() && t.scalar_type() == x.scalar_type() && t.device() == x.device() && t.sizes() == sizes &&
         t.is_contiguous();
}

void* CurrentStream(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

void CheckLaunch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": kernel launch failed: ", kernels::CudaErrorString(code));
}
#endif

}  // namespace

void SetFusedKernels(bool on) { Switch().store(on); }
bool FusedKernelsEnabled() { return Switch().load(); }

#ifndef DEFKV_WITH_CUDA
bool FusedRmsNormOut(const at::Tensor&, const at::Tensor&, double, at::Tensor&) { return false; }
at::Tensor FusedRmsNorm(const at::Tensor&, const at::Tensor&, double) { return {}; }
bool FusedRopeInPlace(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
#else

bool FusedRmsNormOut(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out) {
  if (!Covered(x) || x.dim() == 0 || x.stride(-1) != 1) return false;
  const int64_t n = x.size(-1);
  if (!Matches(w, x, {n}) || !Matches(out, x, x.sizes())) return false;
  // x as [outer, inner, n] rows.
  int64_t outer = 1, inner = 1, stride_outer = n, stride_inner = 0;
  if (x.dim() == 2) {
    outer = x.size(0), stride_outer = x.stride(0);
  } else if (x.dim() == 3) {
    outer = x.size(0), inner = x.size(1), stride_outer = x.stride(0), stride_inner = x.stride(1);
  } else if (x.is_contiguous()) {
    outer = n == 0 ? 0 : x.numel() / n;
  } else {
    return false;
  }
  c10::cuda::CUDAGuard guard(x.device());
  CheckLaunch(kernels::RmsNorm(*KernelDType(x.scalar_type()), x.data_ptr(), outer, inner, n, stride_outer,
                               stride_inner, w.data_ptr(), static_cast<float>(eps), out.data_ptr(), CurrentStream(x)),
              "FusedRmsNorm");
  return true;
}

at::Tensor FusedRmsNorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  if (!Covered(x)) return {};
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  return FusedRmsNormOut(x, w, eps, out) ? out : at::Tensor();
}

bool FusedRopeInPlace(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!Covered(x) || x.dim() != 3 || x.stride(2) != 1 || x.size(2) % 2 != 0) return false;
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2);
  if (!Matches(cos, x, {t, d}) || !Matches(sin, x, {t, d})) return false;
  // In place is only safe when no two (token, head) rows share memory: order the two outer dims
  // by stride and check that each steps past everything inside it.
  std::pair<int64_t, int64_t> dims[2] = {{x.stride(0), t}, {x.stride(1), h}};
  if (dims[0].first > dims[1].first) std::swap(dims[0], dims[1]);
  const auto [in_stride, in_size] = dims[0];
  const auto [out_stride, out_size] = dims[1];
  if (in_size > 1 && in_stride < d) return false;
  if (out_size > 1 && out_stride < (in_size > 1 ? (in_size - 1) * in_stride + d : d)) return false;
  c10::cuda::CUDAGuard guard(x.device());
  CheckLaunch(kernels::RopeInPlace(*KernelDType(x.scalar_type()), x.data_ptr(), t, h, d, x.stride(0), x.stride(1),
                                   cos.data_ptr(), sin.data_ptr(), CurrentStream(x)),
              "FusedRopeInPlace");
  return true;
}

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::model
