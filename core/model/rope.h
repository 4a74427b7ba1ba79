// Rotary position embeddings as transformers computes them (rotate_half layout): inverse
// frequencies per rope type, cos/sin tables for given positions, and their application.
#pragma once

#include <ATen/ATen.h>

#include "core/model/config.h"

namespace defkv::model {

class Rope {
 public:
  Rope(const RopeConfig& cfg, int64_t head_dim, at::Device device);
  // cos, sin: [T, head_dim] in `dtype` for the given int64 positions [T].
  std::pair<at::Tensor, at::Tensor> Tables(const at::Tensor& positions, at::ScalarType dtype) const;
  // x: [H, T, D]; cos, sin: [T, D]. Returns x * cos + rotate_half(x) * sin.
  static at::Tensor Apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
  const at::Tensor& inv_freq() const { return inv_freq_; }

 private:
  at::Tensor inv_freq_;  // [D/2] fp32
};

}  // namespace defkv::model
