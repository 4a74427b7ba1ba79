// A broken model directory gives a clear error naming the file (and the tensor), never a crash.
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/engine/generator.h"
#include "core/model/safetensors.h"

namespace defkv {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class BrokenModel : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = fs::path(DEFKV_TINY_MODELS) / "llama_gqa2";
    ASSERT_TRUE(fs::exists(src_ / "model.safetensors")) << src_ << ": run the make_tiny_models test first";
    dir_ = fs::temp_directory_path() / ("defkv_broken_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    for (const auto& e : fs::directory_iterator(src_)) fs::copy(e.path(), dir_ / e.path().filename());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string LoadError() {
    engine::EngineOptions opts;
    opts.model_dir = dir_.string();
    auto g = engine::Generator::Create(opts);
    EXPECT_FALSE(g.ok()) << "a broken model loaded";
    return g.ok() ? "" : std::string(g.status().message());
  }
  void WriteText(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }
  json ReadJson(const fs::path& p) { std::ifstream in(p); return json::parse(in); }

  // Rewrites model.safetensors with `edit` applied to the header entry of `name`.
  void RewriteTensor(const std::string& name, const std::function<void(json&, std::string&)>& edit) {
    auto f = model::SafetensorsFile::Open((dir_ / "model.safetensors").string());
    ASSERT_TRUE(f.ok()) << f.status();
    json header = json::object();
    std::string data;
    for (const auto& [n, v] : (*f)->tensors()) {
      json e = {{"dtype", model::DTypeName(v.dtype)}, {"shape", v.shape}};
      std::string bytes(reinterpret_cast<const char*>(v.data), v.nbytes);
      if (n == name) edit(e, bytes);
      e["data_offsets"] = {data.size(), data.size() + bytes.size()};
      data += bytes;
      header[n] = e;
    }
    f->reset();
    std::string h = header.dump();
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((static_cast<uint64_t>(h.size()) >> (8 * i)) & 0xff);
    WriteText(dir_ / "model.safetensors", out + h + data);
  }

  fs::path src_, dir_;
};

TEST_F(BrokenModel, MissingConfig) {
  fs::remove(dir_ / "config.json");
  const std::string e = LoadError();
  EXPECT_NE(e.find("config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("missing"), std::string::npos) << e;
}

TEST_F(BrokenModel, CorruptConfig) {
  WriteText(dir_ / "config.json", "{\"model_type\": \"llama\", \"vocab_size\": ");
  const std::string e = LoadError();
  EXPECT_NE(e.find((dir_ / "config.json").string()), std::string::npos) << e;
  EXPECT_NE(e.find("not valid JSON"), std::string::npos) << e;
}

TEST_F(BrokenModel, UnknownModelType) {
  json c = ReadJson(dir_ / "config.json");
  c["model_type"] = "gpt_neox";
  WriteText(dir_ / "config.json", c.dump());
  const std::string e = LoadError();
  EXPECT_NE(e.find("config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("gpt_neox"), std::string::npos) << e;
}

TEST_F(BrokenModel, TruncatedSafetensors) {
  const auto size = fs::file_size(dir_ / "model.safetensors");
  fs::resize_file(dir_ / "model.safetensors", size / 2);
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
}

TEST_F(BrokenModel, WrongDtype) {
  RewriteTensor("model.layers.1.mlp.up_proj.weight", [](json& e, std::string&) { e["dtype"] = "I32"; });
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("I32"), std::string::npos) << e;
}

TEST_F(BrokenModel, ShapeMismatch) {
  RewriteTensor("model.layers.0.self_attn.k_proj.weight", [](json& e, std::string& bytes) {
    const int64_t rows = e["shape"][0].get<int64_t>(), cols = e["shape"][1].get<int64_t>();
    e["shape"] = {rows / 2, cols};
    bytes.resize(bytes.size() / 2);
  });
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.layers.0.self_attn.k_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("shape"), std::string::npos) << e;
}

TEST_F(BrokenModel, MissingTensor) {
  json c = ReadJson(dir_ / "config.json");
  c["num_hidden_layers"] = 3;  // layer 2's tensors do not exist
  WriteText(dir_ / "config.json", c.dump());
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.layers.2."), std::string::npos) << e;
  EXPECT_NE(e.find("missing"), std::string::npos) << e;
}

TEST_F(BrokenModel, MissingTokenizer) {
  fs::remove(dir_ / "tokenizer.json");
  const std::string e = LoadError();
  EXPECT_NE(e.find(dir_.string()), std::string::npos) << e;
  EXPECT_NE(e.find("tokenizer"), std::string::npos) << e;
}

TEST_F(BrokenModel, MissingWeights) {
  fs::remove(dir_ / "model.safetensors");
  const std::string e = LoadError();
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
}

}  // namespace
}  // namespace defkv
