// Reader for the safetensors format: an 8-byte little-endian header length, a JSON header
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw
// tensor bytes. Files are mmap'ed read-only; views point into the mapping and stay valid as long
// as the SafetensorsFile lives. No LibTorch here: the reader is also a fuzz target.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace defkv::model {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

const char* DTypeName(DType d);
size_t DTypeSize(DType d);

struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;  // into the mmap'ed file
  size_t nbytes;
  std::string file;     // the file it came from, for error messages
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps and validates the file: header length within the file, JSON well formed, every entry's
  // dtype known, offsets inside the data section and equal to numel * dtype size.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Same checks on a byte buffer (no file); `name` is used in messages.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBuffer(std::string bytes,
                                                                      const std::string& name);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;
  absl::Status Parse(const uint8_t* bytes, size_t size);

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::string owned_;  // FromBuffer's storage
  std::map<std::string, TensorView> tensors_;
};

// All tensors of a model directory: model.safetensors, or the shards listed in
// model.safetensors.index.json ("weight_map"). Names must be unique across shards.
class WeightStore {
 public:
  static absl::StatusOr<WeightStore> OpenDir(const std::string& dir);
  // nullptr when absent.
  const TensorView* Find(const std::string& name) const;
  size_t total_bytes() const;
  size_t size() const { return index_.size(); }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

}  // namespace defkv::model
