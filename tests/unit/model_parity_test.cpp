// fp32 CPU logits of every tiny family model equal transformers' (tools/make_tiny_models.py)
// within max-abs 1e-4, on a 70-token prefill (run in chunks) and 16 decode steps.
#include <filesystem>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/model/safetensors.h"
#include "core/model/transformer.h"

namespace defkv::model {
namespace {

at::Tensor ToTensor(const TensorView& v) {
  auto dtype = v.dtype == DType::kI64 ? at::kLong : at::kFloat;
  return at::from_blob(const_cast<uint8_t*>(v.data), v.shape, at::TensorOptions().dtype(dtype)).clone();
}

class TinyModel : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyModel, LogitsMatchTransformers) {
  const std::string dir = std::string(DEFKV_TINY_MODELS) + "/" + GetParam();
  ASSERT_TRUE(std::filesystem::exists(dir + "/golden.safetensors")) << dir << ": run the make_tiny_models test first";
  auto golden = SafetensorsFile::Open(dir + "/golden.safetensors");
  ASSERT_TRUE(golden.ok()) << golden.status();
  const auto& g = (*golden)->tensors();
  at::Tensor prefill_ids = ToTensor(g.at("prefill_ids"));
  at::Tensor prefill_logits = ToTensor(g.at("prefill_logits"));
  at::Tensor decode_ids = ToTensor(g.at("decode_ids"));
  at::Tensor decode_logits = ToTensor(g.at("decode_logits"));

  auto model = Transformer::Load(dir, LoadOptions{});
  ASSERT_TRUE(model.ok()) << model.status();
  at::InferenceMode guard;
  auto cache = (*model)->NewCache();
  const int64_t t = prefill_ids.size(0);
  // Uneven chunks exercise the chunked-prefill mask (queries that are not the whole cache).
  std::vector<at::Tensor> rows;
  for (int64_t b = 0, chunk = 17; b < t; b += chunk) {
    const int64_t n = std::min(chunk, t - b);
    rows.push_back((*model)->Forward(prefill_ids.narrow(0, b, n), at::arange(b, b + n, at::kLong), *cache,
                                     /*all_logits=*/true));
  }
  at::Tensor ours = at::cat(rows, 0);
  ASSERT_EQ(ours.sizes(), prefill_logits.sizes());
  const double prefill_err = (ours - prefill_logits).abs().max().item<double>();
  EXPECT_LT(prefill_err, 1e-4) << "prefill max-abs error";
  EXPECT_EQ(ours[t - 1].argmax().item<int64_t>(), decode_ids[0].item<int64_t>());

  for (int64_t s = 0; s < decode_ids.size(0); ++s) {
    at::Tensor step = (*model)->Forward(decode_ids.narrow(0, s, 1), at::full({1}, t + s, at::kLong), *cache);
    const double err = (step[0] - decode_logits[s]).abs().max().item<double>();
    EXPECT_LT(err, 1e-4) << "decode step " << s;
    if (s + 1 < decode_ids.size(0))
      EXPECT_EQ(step[0].argmax().item<int64_t>(), decode_ids[s + 1].item<int64_t>()) << "greedy step " << s;
  }
  EXPECT_EQ(cache->entries(0), (t + decode_ids.size(0)) * (*model)->config().num_kv_heads);
}

INSTANTIATE_TEST_SUITE_P(Families, TinyModel,
                         ::testing::Values("llama_gqa2", "llama3_scaled_tied", "llama_linear_bias", "qwen2", "qwen3",
                                           "mistral"));

}  // namespace
}  // namespace defkv::model
