#include "core/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace defkv::model {
namespace {

using json = nlohmann::json;

// A header larger than this is not a model file (the format's own implementation caps it lower).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::StatusOr<DType> ParseDType(const std::string& s) {
  static const std::map<std::string, DType> kNames = {
      {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16}, {"F64", DType::kF64},
      {"I64", DType::kI64}, {"I32", DType::kI32}, {"I16", DType::kI16},   {"I8", DType::kI8},
      {"U8", DType::kU8},   {"BOOL", DType::kBool}};
  auto it = kNames.find(s);
  if (it == kNames.end()) return absl::InvalidArgumentError(absl::StrCat("unsupported dtype \"", s, "\""));
  return it->second;
}

}  // namespace

const char* DTypeName(DType d) {
  switch (d) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kF64: return "F64";
    case DType::kI64: return "I64";
    case DType::kI32: return "I32";
    case DType::kI16: return "I16";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kBool: return "BOOL";
  }
  return "?";
}

size_t DTypeSize(DType d) {
  switch (d) {
    case DType::kF64: case DType::kI64: return 8;
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF16: case DType::kBF16: case DType::kI16: return 2;
    case DType::kI8: case DType::kU8: case DType::kBool: return 1;
  }
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = path;
  const size_t size = static_cast<size_t>(st.st_size);
  if (size > 0) {
    void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(errno)));
    }
    file->map_ = m;
    file->map_size_ = size;
  }
  ::close(fd);
  if (auto s = file->Parse(static_cast<const uint8_t*>(file->map_), size); !s.ok()) return s;
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBuffer(
    std::string bytes, const std::string& name) {
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = name;
  file->owned_ = std::move(bytes);
  if (auto s = file->Parse(reinterpret_cast<const uint8_t*>(file->owned_.data()), file->owned_.size());
      !s.ok())
    return s;
  return file;
}

absl::Status SafetensorsFile::Parse(const uint8_t* bytes, size_t size) {
  auto fail = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": not a valid safetensors file: ", what));
  };
  if (size < 8) return fail(absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8)
    return fail(absl::StrCat("header length ", header_len, " exceeds the file size ", size,
                             " (truncated file?)"));
  const uint8_t* data = bytes + 8 + header_len;
  const size_t data_size = size - 8 - header_len;

  json header = json::parse(bytes + 8, bytes + 8 + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return fail("the JSON header does not parse as an object");

  for (auto& item : header.items()) {
    // Named copies, not structured bindings: lambdas below capture them (clang 14 refuses
    // capturing bindings).
    const std::string name = item.key();
    const json& entry = item.value();
    if (name == "__metadata__") continue;
    auto tfail = [&](const std::string& what) { return fail(absl::StrCat("tensor \"", name, "\": ", what)); };
    if (!entry.is_object()) return tfail("entry is not an object");
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto off = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string()) return tfail("missing dtype");
    if (sh == entry.end() || !sh->is_array()) return tfail("missing shape");
    if (off == entry.end() || !off->is_array() || off->size() != 2) return tfail("missing data_offsets");
    auto dtype = ParseDType(dt->get<std::string>());
    if (!dtype.ok()) return tfail(std::string(dtype.status().message()));

    TensorView view;
    view.name = name;
    view.dtype = *dtype;
    view.file = path_;
    // numel in 128 bits' worth of care: reject anything whose byte count would overflow.
    uint64_t numel = 1;
    for (auto& d : *sh) {
      if (!d.is_number_unsigned()) return tfail("shape has a non-integer or negative dimension");
      uint64_t v = d.get<uint64_t>();
      if (v != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / v) return tfail("shape overflows");
      numel *= v;
      view.shape.push_back(static_cast<int64_t>(v));
    }
    if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) return tfail("bad data_offsets");
    uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
    if (begin > end || end > data_size)
      return tfail(absl::StrCat("data_offsets [", begin, ", ", end, "] outside the ", data_size,
                                "-byte data section (truncated file?)"));
    const uint64_t expected = numel * DTypeSize(view.dtype);
    if (end - begin != expected)
      return tfail(absl::StrCat("holds ", end - begin, " bytes but shape x ", DTypeName(view.dtype),
                                " needs ", expected));
    view.data = data + begin;
    view.nbytes = static_cast<size_t>(expected);
    tensors_.emplace(name, std::move(view));
  }
  return absl::OkStatus();
}

absl::StatusOr<WeightStore> WeightStore::OpenDir(const std::string& dir) {
  namespace fs = std::filesystem;
  WeightStore store;
  std::vector<std::string> shard_names;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    json index = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.contains("weight_map") || !index["weight_map"].is_object())
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": not a valid index (no \"weight_map\" object)"));
    std::set<std::string> unique;
    for (auto& [name, shard] : index["weight_map"].items()) {
      if (!shard.is_string())
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": shard of \"", name, "\" is not a string"));
      unique.insert(shard.get<std::string>());
    }
    shard_names.assign(unique.begin(), unique.end());
  } else if (fs::exists(single_path)) {
    shard_names.push_back("model.safetensors");
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  for (const auto& shard : shard_names) {
    if (shard.find('/') != std::string::npos || shard == "..")
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": shard name \"", shard, "\" is not a plain file name"));
    auto file = SafetensorsFile::Open((fs::path(dir) / shard).string());
    if (!file.ok()) return file.status();
    store.files_.push_back(std::move(*file));
    for (const auto& [name, view] : store.files_.back()->tensors()) {
      if (!store.index_.emplace(name, &view).second)
        return absl::InvalidArgumentError(absl::StrCat(view.file, ": tensor \"", name, "\" also appears in another shard"));
    }
  }
  return store;
}

const TensorView* WeightStore::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

size_t WeightStore::total_bytes() const {
  size_t n = 0;
  for (const auto& [_, v] : index_) n += v->nbytes;
  return n;
}

}  // namespace defkv::model
