// The fused projected value norm (kernels/value_norm.h) against the formula on the CPU in fp32
// and against ProjectedValueNorm's ATen path on the GPU (part of gpu_test: built only with
// DEFKV_CUDA=ON, run on the GPU machine, ctest -L gpu). Outputs of the raw entry point are
// NaN-poisoned first, so an unwritten element fails.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <string>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>

#include "core/model/fused_ops.h"
#include "core/model/transformer.h"
#include "core/press/press.h"
#include "kernels/value_norm.h"
#include "tests/unit/gpu_util.h"

namespace defkv {
namespace {

using testing::FreshSeed;
using testing::RelErr;

class GpuValueNorm : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: this suite runs on the GPU machine only";
  }
};

kernels::DType KernelDType(at::ScalarType t) {
  return t == at::kHalf ? kernels::DType::kFloat16 : kernels::DType::kBFloat16;
}

// out[h, t] = sum_e |sum_c values[h / G, t, c] * w_o[e, h D + c]|, in fp32 on the CPU from the
// same (rounded) inputs. values: [H_kv, n, D]; w_o: [hidden, hq D].
at::Tensor Reference(const at::Tensor& values, const at::Tensor& w_o, int64_t hq) {
  const auto v = values.to(at::kCPU, at::kFloat), w = w_o.to(at::kCPU, at::kFloat);
  const int64_t group = hq / v.size(0), d = v.size(2);
  at::Tensor out = at::empty({hq, v.size(1)});
  for (int64_t h = 0; h < hq; ++h) out[h] = at::matmul(v[h / group], w.narrow(1, h * d, d).t()).abs().sum(-1);
  return out;
}

// The raw entry point into a NaN-poisoned [hq, n] output.
at::Tensor RawKernel(const at::Tensor& values, const at::Tensor& w_o, int64_t hq, int* code) {
  const int64_t n = values.size(1);
  at::Tensor out = at::full({hq, n}, NAN, values.options().dtype(at::kFloat));
  *code = kernels::ValueNormL1(KernelDType(values.scalar_type()), values.data_ptr(), values.size(0), n,
                               values.stride(0), w_o.data_ptr(), hq, values.size(2), w_o.size(0),
                               out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

// A one-layer random model with these attention shapes: ProjectedValueNorm reads its config and
// o_proj weight ([hidden, hq D], N(0, 0.02)).
std::unique_ptr<model::Transformer> OneLayer(int64_t hq, int64_t hkv, int64_t d, int64_t hidden, at::ScalarType dtype,
                                             uint64_t seed) {
  model::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 64, c.hidden_size = hidden, c.intermediate_size = 64, c.num_layers = 1;
  c.num_heads = hq, c.num_kv_heads = hkv, c.head_dim = d, c.max_position_embeddings = 8192;
  model::LoadOptions o;
  o.device = at::kCUDA;
  o.dtype = dtype;
  auto m = model::Transformer::Random(c, o, seed);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// ProjectedValueNorm over the first n tokens of values [H_kv, L, D], with the fused kernels on
// or off (the ATen path); the switch is restored after.
at::Tensor ProjectedNorm(const model::Transformer& m, const at::Tensor& values, int64_t n, bool fused) {
  struct Restore {
    bool was = model::FusedKernelsEnabled();
    ~Restore() { model::SetFusedKernels(was); }
  } restore;
  model::SetFusedKernels(fused);
  press::LayerInputs in;
  in.model = &m;
  in.keys = values;  // only its head count is read
  in.values = values;
  return press::ProjectedValueNorm(in, n);
}

// Values whose products are exact in bf16 and fp16, so every sum is known:
// w_o[e, k] = (-1)^e * 0.5 * (k % 4), hidden = 64, D = 64, two query heads on one kv head.
// Token rows (unit vectors u_c): u_0 -> 0, u_1 -> 64 * 0.5 = 32, u_2 -> 64, u_1 + u_3 -> 64 * 2 =
// 128, u_1 - u_2 -> 64 * |0.5 - 1| = 32 (the abs is taken after the sum over c: 96 otherwise).
TEST_F(GpuValueNorm, HandComputedCase) {
  const int64_t d = 64, hidden = 64, hq = 2, cap = 8, n = 5;
  const at::Tensor sign = 1 - 2 * (at::arange(hidden) % 2);  // (-1)^e
  const at::Tensor w = sign.unsqueeze(1) * 0.5 * (at::arange(hq * d) % 4).unsqueeze(0).to(at::kFloat);
  at::Tensor buf = at::zeros({1, cap, d});
  const auto set = [&](int64_t t, int64_t c, float x) { buf.index_put_({0, t, c}, x); };
  set(0, 0, 1);
  set(1, 1, 1);
  set(2, 2, 1);
  set(3, 1, 1);
  set(3, 3, 1);
  set(4, 1, 1);
  set(4, 2, -1);
  const at::Tensor expected = at::tensor({0.f, 32.f, 64.f, 128.f, 32.f}).repeat({hq, 1});
  EXPECT_TRUE(at::equal(Reference(buf.narrow(1, 0, n), w, hq), expected));
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    const auto opts = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    const at::Tensor values = buf.to(opts).narrow(1, 0, n), w_o = w.to(opts);
    int code = -1;
    const at::Tensor out = RawKernel(values, w_o, hq, &code);
    ASSERT_EQ(code, 0) << kernels::CudaErrorString(code);
    EXPECT_TRUE(at::equal(out.cpu(), expected)) << dtype << "\n" << out.cpu();
  }
}

// Every (dtype, D, GQA group, hidden, n) of the grid: n not a multiple of the token tile (1, 37,
// 1000, 4099), values a narrow of a longer [H_kv, cap, D] buffer (head stride != n D).
TEST_F(GpuValueNorm, MatchesCpuAndAtenPath) {
  const uint64_t seed = FreshSeed();
  const int64_t hkv = 2;
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    const auto opts = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    double worst_cpu = 0, worst_aten = 0;
    for (int64_t d : {64, 128, 256})
      for (int64_t group : {1, 4})
        for (int64_t hidden : {256, 4096}) {
          const int64_t hq = hkv * group;
          const auto m = OneLayer(hq, hkv, d, hidden, dtype, seed + d + group + hidden);
          ASSERT_NE(m, nullptr);
          const at::Tensor& w_o = m->layer(0).w_o;
          for (int64_t n : {1, 37, 1000, 4099}) {
            const std::string what = std::string(c10::toString(dtype)) + " D " + std::to_string(d) + " G " +
                                     std::to_string(group) + " hidden " + std::to_string(hidden) + " n " +
                                     std::to_string(n) + " seed " + std::to_string(seed);
            const at::Tensor buf = at::randn({hkv, n + 13, d}, opts), values = buf.narrow(1, 0, n);
            int code = -1;
            const at::Tensor out = RawKernel(values, w_o, hq, &code);
            ASSERT_EQ(code, 0) << what << ": " << kernels::CudaErrorString(code);
            ASSERT_FALSE(at::isnan(out).any().item<bool>()) << what << ": unwritten or NaN outputs";
            const double err_cpu = RelErr(out, Reference(values, w_o, hq));
            EXPECT_LT(err_cpu, 1e-2) << what;

            // Through ProjectedValueNorm: the fused path is the raw kernel; the ATen path agrees.
            const at::Tensor fused = ProjectedNorm(*m, buf, n, true), aten = ProjectedNorm(*m, buf, n, false);
            EXPECT_TRUE(at::equal(fused, out)) << what << ": ProjectedValueNorm did not take the kernel";
            const double err_aten = RelErr(fused, aten);
            EXPECT_LT(err_aten, 1e-2) << what;
            worst_cpu = std::max(worst_cpu, err_cpu);
            worst_aten = std::max(worst_aten, err_aten);
          }
        }
    std::printf("[gpu] value norm %-9s worst rel err %.2e vs CPU fp32, %.2e vs the ATen path (seed %llu)\n",
                c10::toString(dtype), worst_cpu, worst_aten, static_cast<unsigned long long>(seed));
  }
}

// What the kernel does not take, the wrapper declines (undefined result) and ProjectedValueNorm
// still answers through ATen: fp32, hidden not a multiple of 64, values not 16-byte aligned.
TEST_F(GpuValueNorm, DeclinesWhatItDoesNotTake) {
  const uint64_t seed = FreshSeed();
  const int64_t hq = 4, hkv = 2, d = 128, n = 50;
  const auto check_declined = [&](const model::Transformer& m, const at::Tensor& values, const std::string& what) {
    EXPECT_FALSE(model::FusedValueNorm(values, m.layer(0).w_o, hq).defined()) << what;
    const at::Tensor out = ProjectedNorm(m, values, n, true);
    EXPECT_LT(RelErr(out, Reference(values, m.layer(0).w_o, hq)), 1e-2) << what << " seed " << seed;
  };
  const auto f32 = OneLayer(hq, hkv, d, 256, at::kFloat, seed);
  ASSERT_NE(f32, nullptr);
  check_declined(*f32, at::randn({hkv, n, d}, at::TensorOptions().device(at::kCUDA)), "fp32");

  const auto odd_hidden = OneLayer(hq, hkv, d, 96, at::kBFloat16, seed);
  ASSERT_NE(odd_hidden, nullptr);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  check_declined(*odd_hidden, at::randn({hkv, n, d}, bf16), "hidden 96");
  int code = 0;
  RawKernel(at::randn({hkv, n, d}, bf16), odd_hidden->layer(0).w_o, hq, &code);
  EXPECT_NE(code, 0) << "the raw entry point takes hidden 96";

  const auto m = OneLayer(hq, hkv, d, 256, at::kBFloat16, seed);
  ASSERT_NE(m, nullptr);
  // 4 elements (8 bytes) past an aligned allocation.
  const at::Tensor flat = at::randn({hkv * n * d + 4}, bf16);
  check_declined(*m, flat.narrow(0, 4, hkv * n * d).view({hkv, n, d}), "8-byte aligned values");
}

// Timing at a long context, Llama-3-8B shapes (printed, not asserted): the kernel, the ATen
// path it replaces, and the kernel's rate (2 hq n D hidden flops).
TEST_F(GpuValueNorm, TimingAtLongContext) {
  const uint64_t seed = FreshSeed();
  const int64_t n = 32768, hq = 32, hkv = 8, d = 128, hidden = 4096;
  const auto m = OneLayer(hq, hkv, d, hidden, at::kBFloat16, seed);
  ASSERT_NE(m, nullptr);
  const at::Tensor buf = at::randn({hkv, n + 512, d}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
  const at::Tensor values = buf.narrow(1, 0, n);
  const auto time_ms = [](const std::function<at::Tensor()>& run) {
    for (int i = 0; i < 3; ++i) run();
    c10::cuda::device_synchronize();
    constexpr int kRuns = 10;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < kRuns; ++i) run();
    c10::cuda::device_synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / kRuns;
  };
  const double kernel_ms = time_ms([&] { return model::FusedValueNorm(values, m->layer(0).w_o, hq); });
  const double aten_ms = time_ms([&] { return ProjectedNorm(*m, buf, n, false); });
  const at::Tensor fused = model::FusedValueNorm(values, m->layer(0).w_o, hq);
  ASSERT_TRUE(fused.defined());
  const double err = RelErr(fused, ProjectedNorm(*m, buf, n, false));
  EXPECT_LT(err, 1e-2) << "seed " << seed;
  const double flops = 2.0 * hq * n * d * hidden;
  std::printf("[gpu] value norm bf16 n %lld, hq %lld, kv %lld, D %lld, hidden %lld: kernel %.3f ms (%.0f TFLOP/s), "
              "ATen path %.3f ms (%.1fx), rel err %.2e vs ATen (seed %llu)\n",
              static_cast<long long>(n), static_cast<long long>(hq), static_cast<long long>(hkv),
              static_cast<long long>(d), static_cast<long long>(hidden), kernel_ms, flops / kernel_ms * 1e-9, aten_ms,
              aten_ms / kernel_ms, err, static_cast<unsigned long long>(seed));
}

}  // namespace
}  // namespace defkv
