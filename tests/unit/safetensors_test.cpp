#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "core/model/safetensors.h"

namespace defkv::model {
namespace {

// Builds a safetensors byte string from a JSON header and a data section.
std::string Pack(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

TEST(Safetensors, ReadsTensorsAndMetadata) {
  float vals[3] = {1.5f, -2.0f, 3.25f};
  std::string data(reinterpret_cast<const char*>(vals), sizeof(vals));
  data += std::string("\x01\x00", 2);
  auto f = SafetensorsFile::FromBuffer(
      Pack(R"({"__metadata__":{"a":"b"},"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
           R"("h":{"dtype":"BF16","shape":[1],"data_offsets":[12,14]}})",
           data),
      "mem");
  ASSERT_TRUE(f.ok()) << f.status();
  const auto& t = (*f)->tensors();
  ASSERT_EQ(t.size(), 2u);
  const TensorView& w = t.at("w");
  EXPECT_EQ(w.dtype, DType::kF32);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{3}));
  float got[3];
  std::memcpy(got, w.data, 12);
  EXPECT_EQ(got[2], 3.25f);
  EXPECT_EQ(t.at("h").nbytes, 2u);
}

TEST(Safetensors, RejectsMalformedFiles) {
  struct Case {
    std::string bytes, expect;
  } cases[] = {
      {"abc", "shorter than the 8-byte header"},
      {Pack("{", ""), "does not parse"},
      {std::string("\xff\xff\xff\xff\x00\x00\x00\x00{}", 10), "exceeds the file size"},
      {Pack(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(8, '\0')), "truncated"},
      {Pack(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')), "needs 12"},
      {Pack(R"({"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", std::string(1, '\0')), "unsupported dtype"},
      {Pack(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", std::string(4, '\0')), "negative"},
      {Pack(R"({"w":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,4]}})", std::string(4, '\0')), "overflows"},
      {Pack(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", std::string(8, '\0')), "outside"},
      {Pack(R"({"w":5})", ""), "not an object"},
  };
  for (const auto& c : cases) {
    auto f = SafetensorsFile::FromBuffer(c.bytes, "bad.safetensors");
    ASSERT_FALSE(f.ok()) << c.expect;
    EXPECT_NE(f.status().message().find("bad.safetensors"), std::string::npos) << f.status();
    EXPECT_NE(f.status().message().find(c.expect), std::string::npos) << f.status();
  }
}

TEST(Safetensors, MissingFileIsNotFound) {
  auto f = SafetensorsFile::Open("/nonexistent/model.safetensors");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace defkv::model
