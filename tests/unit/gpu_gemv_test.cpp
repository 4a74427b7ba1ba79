// The weight GEMV (kernels/gemv.h) against x W^T + b on the CPU in fp32 and against at::linear
// (cuBLAS) on the GPU, its reference (part of gpu_test: built only with DEFKV_CUDA=ON, run on the
// GPU machine, ctest -L gpu). Outputs of the raw entry point are NaN-poisoned first, so an
// unwritten element fails.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>

#include "core/model/fused_ops.h"
#include "core/model/transformer.h"
#include "kernels/gemv.h"
#include "tests/unit/gpu_util.h"

namespace defkv {
namespace {

using testing::FreshSeed;
using testing::RelErr;

class GpuGemv : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: this suite runs on the GPU machine only";
  }
};

// Both switches FusedLinear follows, set for a scope and restored after it.
struct Switches {
  Switches(bool fused, bool gemv) {
    model::SetFusedKernels(fused);
    model::SetGemvKernel(gemv);
  }
  ~Switches() {
    model::SetFusedKernels(fused_was);
    model::SetGemvKernel(gemv_was);
  }
  bool fused_was = model::FusedKernelsEnabled(), gemv_was = model::GemvKernelEnabled();
};

kernels::DType KernelDType(at::ScalarType t) {
  return t == at::kHalf ? kernels::DType::kFloat16 : kernels::DType::kBFloat16;
}

// The raw entry point into a NaN-poisoned [M, N] output. x: [M, K]; w: [N, K]; b: [N] or undefined.
at::Tensor RawKernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int* code) {
  at::Tensor y = at::full({x.size(0), w.size(0)}, NAN, x.options());
  *code = kernels::Gemv(KernelDType(x.scalar_type()), x.data_ptr(), x.size(0), x.size(1), w.data_ptr(), w.size(0),
                        b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  return y;
}

// x W^T + b in fp32 on the CPU from the same (rounded) inputs; w_cpu is W as fp32 on the CPU.
at::Tensor Reference(const at::Tensor& x, const at::Tensor& w_cpu, const at::Tensor& b) {
  at::Tensor ref = at::matmul(x.to(at::kCPU, at::kFloat), w_cpu.t());
  return b.defined() ? ref + b.to(at::kCPU, at::kFloat) : ref;
}

// Every (dtype, K, N, M, bias): the decode shapes of Llama-3.1-8B's qkv (K 4096, N 6144) and down
// (K 14336, N 4096) projections, a row count that is not a multiple of the 16-row block (1000,
// 37, 33), K with a partial last step or round of steps (3584, 200) and the smallest K (8).
TEST_F(GpuGemv, MatchesCpuAndCublas) {
  const uint64_t seed = FreshSeed();
  const Switches on(true, true);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 6144}, {14336, 4096}, {4096, 1000},
                                                           {3584, 37},   {200, 33},     {8, 16}};
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    const auto opts = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    double worst_cpu = 0, worst_cublas = 0;
    for (const auto& [k, n] : shapes) {
      const at::Tensor w = at::randn({n, k}, opts) * 0.05;
      const at::Tensor w_cpu = w.to(at::kCPU, at::kFloat);
      for (int64_t m : {1, 2, 3, 8}) {
        for (bool with_bias : {false, true}) {
          const std::string what = std::string(c10::toString(dtype)) + " K " + std::to_string(k) + " N " +
                                   std::to_string(n) + " M " + std::to_string(m) + (with_bias ? " bias" : "") +
                                   " seed " + std::to_string(seed);
          const at::Tensor x = at::randn({m, k}, opts);
          const at::Tensor b = with_bias ? at::randn({n}, opts) * 0.5 : at::Tensor();
          int code = -1;
          const at::Tensor out = RawKernel(x, w, b, &code);
          ASSERT_EQ(code, 0) << what << ": " << kernels::CudaErrorString(code);
          ASSERT_FALSE(at::isnan(out).any().item<bool>()) << what << ": unwritten or NaN outputs";
          const double err_cpu = RelErr(out, Reference(x, w_cpu, b));
          EXPECT_LT(err_cpu, 1e-2) << what;

          const at::Tensor fused = model::FusedLinear(x, w, b);
          ASSERT_TRUE(fused.defined()) << what << ": FusedLinear declined";
          EXPECT_TRUE(at::equal(fused, out)) << what << ": wrapper and raw entry point differ";
          const double err_cublas = RelErr(fused, at::linear(x, w, b));
          EXPECT_LT(err_cublas, 1e-2) << what;
          worst_cpu = std::max(worst_cpu, err_cpu);
          worst_cublas = std::max(worst_cublas, err_cublas);
        }
      }
    }
    std::printf("[gpu] gemv %-9s worst rel err %.2e vs CPU fp32, %.2e vs at::linear (seed %llu)\n",
                c10::toString(dtype), worst_cpu, worst_cublas, static_cast<unsigned long long>(seed));
  }
}

// The gate/up GEMV with its SiLU gate in one kernel (GemvSiluGate, FusedLinearSiluGate) gives the
// bits of the GEMV followed by the SiLU gate kernel, and is within bf16/fp16 rounding of
// silu(x Wg^T + bg) * (x Wu^T + bu) in fp32 on the CPU. Shapes: Llama-3.1-8B's (K 4096, inter
// 14336), inter not a multiple of the 8-row block (37, 5), K with a partial step (200) and K 8.
// The raw entry point writes into a NaN-poisoned output.
TEST_F(GpuGemv, SiluGateEqualsGemvThenSiluMul) {
  const uint64_t seed = FreshSeed();
  const Switches on(true, true);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 14336}, {200, 37}, {8, 5}};
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    const auto opts = at::TensorOptions().dtype(dtype).device(at::kCUDA);
    double worst = 0;
    for (const auto& [k, inter] : shapes) {
      const at::Tensor w = at::randn({2 * inter, k}, opts) * 0.05;
      const at::Tensor w_cpu = w.to(at::kCPU, at::kFloat);
      for (int64_t m : {1, 3, 8}) {
        for (bool with_bias : {false, true}) {
          const std::string what = std::string(c10::toString(dtype)) + " K " + std::to_string(k) + " inter " +
                                   std::to_string(inter) + " M " + std::to_string(m) + (with_bias ? " bias" : "") +
                                   " seed " + std::to_string(seed);
          const at::Tensor x = at::randn({m, k}, opts);
          const at::Tensor b = with_bias ? at::randn({2 * inter}, opts) * 0.5 : at::Tensor();
          const at::Tensor fused = model::FusedLinearSiluGate(x, w, b);
          ASSERT_TRUE(fused.defined()) << what << ": FusedLinearSiluGate declined";
          EXPECT_EQ(fused.sizes(), (std::vector<int64_t>{m, inter})) << what;
          const at::Tensor gu = model::FusedLinear(x, w, b);
          ASSERT_TRUE(gu.defined()) << what;
          const at::Tensor two = model::FusedSiluMul(gu);
          ASSERT_TRUE(two.defined()) << what;
          EXPECT_TRUE(at::equal(fused, two)) << what << ": not the bits of the GEMV and the SiLU gate kernel";

          at::Tensor raw = at::full({m, inter}, NAN, opts);
          const int code = kernels::GemvSiluGate(KernelDType(dtype), x.data_ptr(), m, k, w.data_ptr(), inter,
                                                 with_bias ? b.data_ptr() : nullptr, raw.data_ptr(),
                                                 c10::cuda::getCurrentCUDAStream().stream());
          ASSERT_EQ(code, 0) << what << ": " << kernels::CudaErrorString(code);
          EXPECT_TRUE(at::equal(raw, fused)) << what << ": unwritten outputs or wrapper and entry point differ";

          const at::Tensor ref_gu = Reference(x, w_cpu, b);
          const at::Tensor ref = at::silu(ref_gu.narrow(1, 0, inter)) * ref_gu.narrow(1, inter, inter);
          const double err = RelErr(fused, ref);
          EXPECT_LT(err, 1e-2) << what;
          worst = std::max(worst, err);
        }
      }
    }
    std::printf("[gpu] gemv + SiLU gate %-9s worst rel err %.2e vs CPU fp32 (seed %llu)\n", c10::toString(dtype),
                worst, static_cast<unsigned long long>(seed));
  }
  // An odd number of rows has no gate/up halves: declined.
  const auto opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  EXPECT_FALSE(model::FusedLinearSiluGate(at::randn({1, 64}, opts), at::randn({7, 64}, opts), {}).defined());
}

// x of other ranks, as at::linear takes them: [K] -> [N] and [1, 2, K] -> [1, 2, N], the same
// bits as the [M, K] call.
TEST_F(GpuGemv, TakesAnyRankOfRows) {
  const uint64_t seed = FreshSeed();
  const Switches on(true, true);
  const auto opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const int64_t k = 512, n = 300;
  const at::Tensor w = at::randn({n, k}, opts), b = at::randn({n}, opts);
  const at::Tensor x1 = at::randn({k}, opts), x3 = at::randn({1, 2, k}, opts);
  const at::Tensor y1 = model::FusedLinear(x1, w, b), y3 = model::FusedLinear(x3, w, b);
  ASSERT_TRUE(y1.defined() && y3.defined()) << "seed " << seed;
  EXPECT_EQ(y1.sizes(), (std::vector<int64_t>{n}));
  EXPECT_EQ(y3.sizes(), (std::vector<int64_t>{1, 2, n}));
  EXPECT_TRUE(at::equal(y1, model::FusedLinear(x1.view({1, k}), w, b).view({n}))) << "seed " << seed;
  EXPECT_TRUE(at::equal(y3, model::FusedLinear(x3.view({2, k}), w, b).view({1, 2, n}))) << "seed " << seed;
}

// What the kernel does not take, FusedLinear declines (undefined) and the raw entry point
// refuses (a non-zero code): more than 8 rows, K not a multiple of 8, fp32, x not 16-byte
// aligned. The wrapper also declines CPU tensors, non-contiguous x or w, and either switch off.
TEST_F(GpuGemv, DeclinesWhatItDoesNotTake) {
  const uint64_t seed = FreshSeed();
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const int64_t k = 256, n = 64;
  const at::Tensor w = at::randn({n, k}, bf16), x = at::randn({2, k}, bf16), b = at::randn({n}, bf16);
  const auto declined = [&](const at::Tensor& xi, const at::Tensor& wi, const at::Tensor& bi, const char* what) {
    EXPECT_FALSE(model::FusedLinear(xi, wi, bi).defined()) << what << " seed " << seed;
  };
  {
    const Switches on(true, true);
    ASSERT_TRUE(model::FusedLinear(x, w, b).defined()) << "the covered case is declined";
    declined(at::randn({9, k}, bf16), w, b, "9 rows");
    declined(at::randn({2, 100}, bf16), at::randn({n, 100}, bf16), b, "K 100");
    declined(x.to(at::kFloat), w.to(at::kFloat), b.to(at::kFloat), "fp32");
    declined(x.cpu(), w.cpu(), b.cpu(), "CPU tensors");
    // 1 element (2 bytes) past an aligned allocation.
    const at::Tensor flat = at::randn({2 * k + 1}, bf16);
    declined(flat.narrow(0, 1, 2 * k).view({2, k}), w, b, "x 2-byte aligned");
    declined(at::randn({k, 2}, bf16).t(), w, b, "x transposed");
    declined(x, at::randn({k, n}, bf16).t(), b, "w transposed");
    declined(x, w, at::randn({n + 1}, bf16), "bias of the wrong size");
    declined(at::randn({0, k}, bf16), w, b, "no rows");

    int code = 0;
    RawKernel(at::randn({9, k}, bf16), w, b, &code);
    EXPECT_NE(code, 0) << "the raw entry point takes 9 rows";
    code = 0;
    RawKernel(at::randn({2, 100}, bf16), at::randn({n, 100}, bf16), b, &code);
    EXPECT_NE(code, 0) << "the raw entry point takes K 100";
  }
  {
    const Switches gemv_off(true, false);
    declined(x, w, b, "DEFKV_GEMV_KERNEL off");
  }
  {
    const Switches fused_off(false, true);
    declined(x, w, b, "DEFKV_FUSED_KERNELS off");
  }
}

// Captured in a CUDA graph (as the decode graphs capture it) and replayed over new inputs
// written in place: the same bits as an eager call on those inputs.
TEST_F(GpuGemv, ReplaysInCudaGraph) {
  const uint64_t seed = FreshSeed();
  const Switches on(true, true);
  const auto opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const int64_t k = 4096, n = 1000;
  const at::Tensor w = at::randn({n, k}, opts), b = at::randn({n}, opts);
  at::Tensor x = at::randn({4, k}, opts);
  c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool());
  at::cuda::CUDAGraph graph;
  graph.capture_begin();
  const at::Tensor y = model::FusedLinear(x, w, b);
  graph.capture_end();
  ASSERT_TRUE(y.defined());
  for (int i = 0; i < 3; ++i) {
    x.normal_();
    graph.replay();
    const at::Tensor eager = model::FusedLinear(x, w, b);
    c10::cuda::device_synchronize();
    EXPECT_TRUE(at::equal(y, eager)) << "replay " << i << " seed " << seed;
    EXPECT_LT(RelErr(y, at::linear(x, w, b)), 1e-2) << "replay " << i << " seed " << seed;
  }
}

// A random bf16 model with the kernel on and off (at::linear), the other fused kernels on: the
// prefill (23 rows, cuBLAS either way) and three decode steps (one row: the kernel, the gate/up
// one with its SiLU gate) give the same logits within bf16 rounding. With and without the qkv bias (Qwen2's).
TEST_F(GpuGemv, KeepsModelLogits) {
  const uint64_t seed = FreshSeed();
  for (bool qkv_bias : {false, true}) {
    auto m = testing::TinyBf16Model(qkv_bias ? "qwen2" : "llama", seed);
    ASSERT_TRUE(m.ok()) << m.status();
    const model::ModelConfig& c = (*m)->config();
    const at::Tensor ids = at::randint(0, c.vocab_size, {23}, at::kLong);
    const auto logits = [&](bool gemv) {
      const Switches s(true, gemv);
      auto cache = (*m)->NewCache();
      std::vector<at::Tensor> out = {(*m)->Forward(ids.narrow(0, 0, 20), at::arange(20, at::kLong), *cache, true)};
      for (int64_t p = 20; p < 23; ++p)
        out.push_back((*m)->Forward(ids.narrow(0, p, 1), at::full({1}, p, at::kLong), *cache, true));
      return at::cat(out, 0);
    };
    {
      // The kernel takes the model's own projections, the biased qkv one included.
      const Switches s(true, true);
      const auto& layer = (*m)->layer(0);
      const at::Tensor x = at::randn({1, c.hidden_size}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
      EXPECT_EQ(model::FusedLinear(x, layer.w_qkv, layer.b_qkv).defined(), true) << "qkv_bias " << qkv_bias;
      EXPECT_TRUE(model::FusedLinear(x, layer.w_gate_up, layer.b_gate_up).defined());
      EXPECT_TRUE(model::FusedLinearSiluGate(x, layer.w_gate_up, layer.b_gate_up).defined());
    }
    const at::Tensor with = logits(true), without = logits(false);
    ASSERT_EQ(with.sizes(), (std::vector<int64_t>{23, c.vocab_size}));
    EXPECT_TRUE(at::equal(with.narrow(0, 0, 20), without.narrow(0, 0, 20)))
        << "the 20-row prefill does not use the kernel, so its logits are cuBLAS's";
    const double err = RelErr(with.narrow(0, 20, 3), without.narrow(0, 20, 3));
    std::printf("[gpu] gemv kernel, tiny bf16 model%s: decode logits rel err %.2e vs at::linear (seed %llu)\n",
                qkv_bias ? " with qkv bias" : "", err, static_cast<unsigned long long>(seed));
    EXPECT_LT(err, 1e-2) << "qkv_bias " << qkv_bias << " seed " << seed;
  }
}

}  // namespace
}  // namespace defkv
