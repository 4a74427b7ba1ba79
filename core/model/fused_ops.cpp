#include "core/model/fused_ops.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "kernels/device_info.h"

#ifdef DEFKV_WITH_CUDA
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/decode_attention.h"
#include "kernels/gemv.h"
#include "kernels/kv_append.h"
#include "kernels/norm_rope.h"
#include "kernels/value_norm.h"
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

std::atomic<bool>& DecodeSwitch() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("DEFKV_DECODE_KERNEL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }()};
  return on;
}

std::atomic<bool>& GemvSwitch() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("DEFKV_GEMV_KERNEL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }()};
  return on;
}

std::atomic<bool>& RopeAppendSwitch() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("DEFKV_ROPE_APPEND");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }()};
  return on;
}

std::atomic<int64_t> g_min_chunk{0}, g_blocks_per_sm{0};

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

// Whether a and b share no memory (the kernels read one while they write the other).
bool Apart(const at::Tensor& a, const at::Tensor& b) {
  return at::get_overlap_status(a, b) == at::MemOverlapStatus::No;
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
void SetGemvKernel(bool on) { GemvSwitch().store(on); }
bool GemvKernelEnabled() { return GemvSwitch().load(); }
void SetRopeAppend(bool on) { RopeAppendSwitch().store(on); }
bool RopeAppendEnabled() { return RopeAppendSwitch().load(); }
// kernels/ is linked into this library and again into the programs that use core's internals:
// the switch the kernels launched from here follow is this library's copy.
void SetDependentLaunch(bool on) { kernels::SetDependentLaunch(on); }
bool DependentLaunchEnabled() { return kernels::DependentLaunch(); }
void SetDecodeAttentionTuning(int64_t min_chunk, int64_t blocks_per_sm) {
  g_min_chunk.store(min_chunk);
  g_blocks_per_sm.store(blocks_per_sm);
}

#ifndef DEFKV_WITH_CUDA
bool FusedRmsNormOut(const at::Tensor&, const at::Tensor&, double, at::Tensor&) { return false; }
at::Tensor FusedRmsNorm(const at::Tensor&, const at::Tensor&, double) { return {}; }
bool FusedAddRmsNormInPlace(at::Tensor&, const at::Tensor&, const at::Tensor&, double, at::Tensor&) { return false; }
bool FusedSiluMulOut(const at::Tensor&, at::Tensor&) { return false; }
at::Tensor FusedSiluMul(const at::Tensor&) { return {}; }
bool FusedRopeInPlace(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
at::Tensor FusedLinear(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return {}; }
at::Tensor FusedLinearSiluGate(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return {}; }
at::Tensor FusedDecodeAttention(const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, int64_t, double) {
  return {};
}
bool FusedAppendRows(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return false;
}
bool FusedRopeAppend(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return false;
}
at::Tensor FusedValueNorm(const at::Tensor&, const at::Tensor&, int64_t) { return {}; }
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

bool FusedAddRmsNormInPlace(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps, at::Tensor& y) {
  if (!Covered(x) || x.dim() == 0 || !x.is_contiguous()) return false;
  const int64_t n = x.size(-1);
  if (!Matches(delta, x, x.sizes()) || !Matches(w, x, {n}) || (y.defined() && !Matches(y, x, x.sizes())))
    return false;
  // The kernel takes delta in 16-byte packs whenever it takes x so (kernels/norm_rope.h).
  if (reinterpret_cast<uintptr_t>(delta.data_ptr()) % 16 != 0) return false;
  // The kernel reads delta and w while it writes x and y.
  if (!Apart(x, delta) || !Apart(x, w) || (y.defined() && (!Apart(y, x) || !Apart(y, delta) || !Apart(y, w))))
    return false;
  c10::cuda::CUDAGuard guard(x.device());
  if (!y.defined()) y = at::empty(x.sizes(), x.options());
  CheckLaunch(kernels::AddRmsNorm(*KernelDType(x.scalar_type()), x.data_ptr(), delta.data_ptr(),
                                  n == 0 ? 0 : x.numel() / n, n, w.data_ptr(), static_cast<float>(eps), y.data_ptr(),
                                  CurrentStream(x)),
              "FusedAddRmsNormInPlace");
  return true;
}

bool FusedSiluMulOut(const at::Tensor& gu, at::Tensor& out) {
  if (!Covered(gu) || gu.dim() == 0 || !gu.is_contiguous() || gu.size(-1) % 2 != 0) return false;
  const int64_t inter = gu.size(-1) / 2;
  std::vector<int64_t> sizes = gu.sizes().vec();
  sizes.back() = inter;
  if (!Matches(out, gu, sizes) || !Apart(out, gu)) return false;
  c10::cuda::CUDAGuard guard(gu.device());
  CheckLaunch(kernels::SiluMul(*KernelDType(gu.scalar_type()), gu.data_ptr(), inter == 0 ? 0 : gu.numel() / (2 * inter),
                               inter, out.data_ptr(), CurrentStream(gu)),
              "FusedSiluMul");
  return true;
}

at::Tensor FusedSiluMul(const at::Tensor& gu) {
  if (!Covered(gu) || gu.dim() == 0) return {};
  std::vector<int64_t> sizes = gu.sizes().vec();
  sizes.back() /= 2;
  at::Tensor out = at::empty(sizes, gu.options().memory_format(at::MemoryFormat::Contiguous));
  return FusedSiluMulOut(gu, out) ? out : at::Tensor();
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

namespace {
// FusedLinear and FusedLinearSiluGate: the checks, the output ([..., out_cols]) and the launch.
template <typename Kernel>
at::Tensor GemvCall(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool silu_gate, Kernel kernel,
                    const char* what) {
  if (!Covered(x) || !GemvKernelEnabled() || x.dim() == 0 || !x.is_contiguous()) return {};
  const auto dtype = *KernelDType(x.scalar_type());
  const int64_t k = x.size(-1), rows = k == 0 ? 0 : x.numel() / k;
  if (!kernels::GemvSupported(dtype, rows, k) || !w.defined() || w.dim() != 2) return {};
  const int64_t n = w.size(0);
  if (!Matches(w, x, {n, k}) || (b.defined() && !Matches(b, x, {n}))) return {};
  if (silu_gate && n % 2 != 0) return {};
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (!aligned(x) || !aligned(w)) return {};
  const int64_t out_cols = silu_gate ? n / 2 : n;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out_cols;
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  CheckLaunch(kernel(dtype, x.data_ptr(), rows, k, w.data_ptr(), out_cols, b.defined() ? b.data_ptr() : nullptr,
                     y.data_ptr(), CurrentStream(x)),
              what);
  return y;
}
}  // namespace

at::Tensor FusedLinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return GemvCall(x, w, b, /*silu_gate=*/false, kernels::Gemv, "FusedLinear");
}

at::Tensor FusedLinearSiluGate(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return GemvCall(x, w, b, /*silu_gate=*/true, kernels::GemvSiluGate, "FusedLinearSiluGate");
}

at::Tensor FusedDecodeAttention(const at::Tensor& q, int64_t heads, const at::Tensor& k_pool,
                                const at::Tensor& v_pool, const at::Tensor& seg_start, const at::Tensor& seg_len,
                                int64_t max_len, double scale) {
  if (!q.defined() || !q.is_cuda() || q.dim() != 3 || heads < 1 || q.size(1) % heads != 0) return {};
  const int64_t t = q.size(0), hq = q.size(1), d = q.size(2), g = hq / heads, n = t * heads;
  if (!DecodeKernelEnabled()) return {};
  const auto dtype = KernelDType(q.scalar_type());
  if (!dtype || !kernels::DecodeAttentionSupported(*dtype, g, d)) return {};
  // Heads of a token adjacent, rows contiguous: [T, H * G, D] with strides (any, D, 1).
  if (q.stride(2) != 1 || (hq > 1 && q.stride(1) != d)) return {};
  const auto pool_ok = [&](const at::Tensor& p) {
    return p.defined() && p.scalar_type() == q.scalar_type() && p.device() == q.device() && p.dim() == 2 &&
           p.size(1) == d && p.is_contiguous() && p.size(0) < INT32_MAX;
  };
  const auto meta_ok = [&](const at::Tensor& m) {
    return m.defined() && m.scalar_type() == at::kInt && m.device() == q.device() && m.dim() == 1 &&
           m.size(0) == n && m.is_contiguous();
  };
  if (!pool_ok(k_pool) || !pool_ok(v_pool) || !meta_ok(seg_start) || !meta_ok(seg_len)) return {};
  const auto aligned = [](const at::Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; };
  if (!aligned(q) || (q.stride(0) * q.element_size()) % 16 != 0 || !aligned(k_pool) || !aligned(v_pool)) return {};
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({t, hq, d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return out;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const kernels::DecodeAttentionTuning tuning{g_min_chunk.load(), g_blocks_per_sm.load()};
  const int64_t splits = kernels::DecodeAttentionSplits(max_len, n, sms, tuning);
  // Scratch for the per-chunk partial results; one chunk per segment writes `out` directly.
  at::Tensor partial_out, partial_lse;
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    partial_out = at::empty({n, splits, g, d}, f32);
    partial_lse = at::empty({n, splits, g}, f32);
  }
  CheckLaunch(kernels::DecodeAttention(*dtype, q.data_ptr(), heads, q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(),
                                       seg_start.data_ptr<int32_t>(), seg_len.data_ptr<int32_t>(), n, g, d, max_len,
                                       static_cast<float>(scale),
                                       splits > 1 ? partial_out.data_ptr<float>() : nullptr,
                                       splits > 1 ? partial_lse.data_ptr<float>() : nullptr, out.data_ptr(), sms,
                                       CurrentStream(q), tuning),
              "FusedDecodeAttention");
  return out;
}

bool FusedAppendRows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows, const at::Tensor& k_pool,
                     const at::Tensor& v_pool) {
  if (!Covered(k) || k.dim() != 3 || k.sizes() != v.sizes() || k.stride(2) != 1 || v.stride(2) != 1) return false;
  const int64_t t = k.size(0), h = k.size(1), d = k.size(2);
  if (v.scalar_type() != k.scalar_type() || v.device() != k.device()) return false;
  if (!Matches(k_pool, k, {k_pool.size(0), d}) || !Matches(v_pool, k, {v_pool.size(0), d})) return false;
  if (!rows.defined() || rows.scalar_type() != at::kLong || rows.device() != k.device() || rows.dim() != 1 ||
      rows.size(0) != t * h || !rows.is_contiguous())
    return false;
  // Whole rows in 16-byte pieces: every address and stride a multiple of 16 bytes.
  const int64_t e = k.element_size();
  for (int64_t bytes : {d * e, k.stride(0) * e, k.stride(1) * e, v.stride(0) * e, v.stride(1) * e})
    if (bytes % 16 != 0) return false;
  for (const at::Tensor* x : {&k, &v, &k_pool, &v_pool})
    if (reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 != 0) return false;
  c10::cuda::CUDAGuard guard(k.device());
  const int code = kernels::AppendRows(*KernelDType(k.scalar_type()), k.data_ptr(), k.stride(0), k.stride(1),
                                       v.data_ptr(), v.stride(0), v.stride(1), t, h, d, rows.data_ptr<int64_t>(),
                                       k_pool.data_ptr(), v_pool.data_ptr(), CurrentStream(k));
  CheckLaunch(code, "FusedAppendRows");
  return true;
}

bool FusedRopeAppend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& rows, const at::Tensor& k_pool, const at::Tensor& v_pool) {
  if (!Covered(q) || !RopeAppendEnabled() || q.dim() != 3 || k.dim() != 3 || v.sizes() != k.sizes()) return false;
  const int64_t t = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1), e = q.element_size();
  if (k.size(0) != t || k.size(2) != d || d % 2 != 0 || hkv < 1) return false;
  for (const at::Tensor* x : {&k, &v})
    if (x->scalar_type() != q.scalar_type() || x->device() != q.device()) return false;
  // q, k, v: the heads of one qkv row, side by side (rows of D contiguous, one token stride).
  for (const at::Tensor* x : {&q, &k, &v})
    if (x->stride(2) != 1 || (x->size(1) > 1 && x->stride(1) != d) || (t > 1 && x->stride(0) != q.stride(0)))
      return false;
  const auto* base = static_cast<const char*>(q.data_ptr());
  if (static_cast<const char*>(k.data_ptr()) != base + hq * d * e ||
      static_cast<const char*>(v.data_ptr()) != base + (hq + hkv) * d * e)
    return false;
  if (!Matches(cos, q, {t, d}) || !Matches(sin, q, {t, d})) return false;
  if (!Matches(k_pool, q, {k_pool.size(0), d}) || !Matches(v_pool, q, {v_pool.size(0), d})) return false;
  if (!rows.defined() || rows.scalar_type() != at::kLong || rows.device() != q.device() || rows.dim() != 1 ||
      rows.size(0) != t * hkv || !rows.is_contiguous())
    return false;
  // The kernel takes 16-byte packs only: say no here rather than fail the launch.
  const int64_t vec = 16 / e, stride_t = t > 1 ? q.stride(0) : (hq + 2 * hkv) * d;
  const auto aligned = [](const at::Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; };
  if ((d / 2) % vec != 0 || stride_t % vec != 0 || !aligned(q) || !aligned(cos) || !aligned(sin) ||
      !aligned(k_pool) || !aligned(v_pool))
    return false;
  c10::cuda::CUDAGuard guard(q.device());
  CheckLaunch(kernels::RopeAppend(*KernelDType(q.scalar_type()), q.data_ptr(), t, hq, hkv, d, stride_t, cos.data_ptr(),
                                  sin.data_ptr(), rows.data_ptr<int64_t>(), k_pool.data_ptr(), v_pool.data_ptr(),
                                  CurrentStream(q)),
              "FusedRopeAppend");
  return true;
}

at::Tensor FusedValueNorm(const at::Tensor& values, const at::Tensor& w_o, int64_t hq) {
  if (!Covered(values) || values.dim() != 3 || !w_o.defined() || w_o.dim() != 2) return {};
  const auto dtype = *KernelDType(values.scalar_type());
  const int64_t hkv = values.size(0), n = values.size(1), d = values.size(2), hidden = w_o.size(0);
  if (!kernels::ValueNormSupported(dtype, d) || hkv < 1 || hq < hkv || hq % hkv != 0 || hidden == 0 ||
      hidden % 64 != 0 || !Matches(w_o, values, {hidden, hq * d}))
    return {};
  // Rows contiguous; the head stride (the cache's capacity) free up to 16-byte alignment.
  if (values.stride(2) != 1 || (n > 1 && values.stride(1) != d) || values.stride(0) % 8 != 0) return {};
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (!aligned(values) || !aligned(w_o)) return {};
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({hq, n}, values.options().dtype(at::kFloat));
  if (n == 0) return out;
  CheckLaunch(kernels::ValueNormL1(dtype, values.data_ptr(), hkv, n, values.stride(0), w_o.data_ptr(), hq, d, hidden,
                                   out.data_ptr<float>(), CurrentStream(values)),
              "FusedValueNorm");
  return out;
}

#endif  // DEFKV_WITH_CUDA

}  // namespace defkv::model
