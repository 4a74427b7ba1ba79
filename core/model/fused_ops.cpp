#include "core/model/fused_ops.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#ifdef DEFKV_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/decode_attention.h"
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

// Off unless DEFKV_DECODE_KERNEL=1: the kernel has not run on a GPU yet (its GPU tests are
// written; the flash call stays the default until they pass).
std::atomic<bool>& DecodeSwitch() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("DEFKV_DECODE_KERNEL");
    return v != nullptr && std::strcmp(v, "1") == 0;
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
void SetDecodeKernel(bool on) { DecodeSwitch().store(on); }
bool DecodeKernelEnabled() { return DecodeSwitch().load(); }

#ifndef DEFKV_WITH_CUDA
bool FusedRmsNormOut(const at::Tensor&, const at::Tensor&, double, at::Tensor&) { return false; }
at::Tensor FusedRmsNorm(const at::Tensor&, const at::Tensor&, double) { return {}; }
bool FusedRopeInPlace(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
at::Tensor FusedDecodeAttention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, int64_t, double) {
  return {};
}
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

at::Tensor FusedDecodeAttention(const at::Tensor& qp, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                const at::Tensor& seg_start, const at::Tensor& seg_len, int64_t max_len,
                                double scale) {
  if (!qp.defined() || !qp.is_cuda() || !DecodeKernelEnabled() || qp.dim() != 3 || !qp.is_contiguous()) return {};
  const auto dtype = KernelDType(qp.scalar_type());
  const int64_t n = qp.size(0), g = qp.size(1), d = qp.size(2);
  if (!dtype || !kernels::DecodeAttentionSupported(*dtype, g, d)) return {};
  const auto pool_ok = [&](const at::Tensor& t) {
    return t.defined() && t.scalar_type() == qp.scalar_type() && t.device() == qp.device() && t.dim() == 2 &&
           t.size(1) == d && t.is_contiguous() && t.size(0) < INT32_MAX;
  };
  const auto meta_ok = [&](const at::Tensor& t) {
    return t.defined() && t.scalar_type() == at::kInt && t.device() == qp.device() && t.dim() == 1 &&
           t.size(0) == n && t.is_contiguous();
  };
  if (!pool_ok(k_pool) || !pool_ok(v_pool) || !meta_ok(seg_start) || !meta_ok(seg_len)) return {};
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (!aligned(qp) || !aligned(k_pool) || !aligned(v_pool)) return {};
  c10::cuda::CUDAGuard guard(qp.device());
  at::Tensor out = at::empty({n, g, d}, qp.options());
  if (n == 0) return out;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = kernels::DecodeAttentionSplits(max_len, n, sms);
  // Scratch for the per-chunk partial results; one chunk per segment writes `out` directly.
  at::Tensor partial_out, partial_lse;
  if (splits > 1) {
    const auto f32 = qp.options().dtype(at::kFloat);
    partial_out = at::empty({n, splits, g, d}, f32);
    partial_lse = at::empty({n, splits, g}, f32);
  }
  CheckLaunch(kernels::DecodeAttention(*dtype, qp.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                                       seg_start.data_ptr<int32_t>(), seg_len.data_ptr<int32_t>(), n, g, d, max_len,
                                       static_cast<float>(scale),
                                       splits > 1 ? partial_out.data_ptr<float>() : nullptr,
                                       splits > 1 ? partial_lse.data_ptr<float>() : nullptr, out.data_ptr(), sms,
                                       CurrentStream(qp)),
              "FusedDecodeAttention");
  return out;
}

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::model
