#include "core/model/rope.h"

#include <cmath>

namespace defkv::model {

Rope::Rope(const RopeConfig& cfg, int64_t head_dim, at::Device device) {
  // Same float32 arithmetic as transformers: base ** (arange(0, dim, 2) / dim), then 1 / that.
  auto exponent = at::arange(0, head_dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) /
                  static_cast<double>(head_dim);
  at::Tensor inv = 1.0 / at::pow(cfg.theta, exponent);
  switch (cfg.type) {
    case RopeType::kDefault:
      break;
    case RopeType::kLinear:
      inv = inv / cfg.factor;
      break;
    case RopeType::kLlama3: {
      // Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
      const double old_len = static_cast<double>(cfg.original_max_position);
      const double low_wavelen = old_len / cfg.low_freq_factor;
      const double high_wavelen = old_len / cfg.high_freq_factor;
      auto wavelen = 2 * M_PI / inv;
      auto scaled = at::where(wavelen > low_wavelen, inv / cfg.factor, inv);
      auto smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor);
      auto smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled;
      auto is_medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
      inv = at::where(is_medium, smoothed, scaled);
      break;
    }
  }
  inv_freq_ = inv.to(at::kFloat).to(device);
}

std::pair<at::Tensor, at::Tensor> Rope::Tables(const at::Tensor& positions, at::ScalarType dtype) const {
  auto freqs = at::outer(positions.to(at::kFloat), inv_freq_);  // [T, D/2]
  auto emb = at::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor Rope::Apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half);
  auto x2 = x.narrow(-1, half, half);
  auto rotated = at::cat({-x2, x1}, -1);
  return x * cos + rotated * sin;
}

}  // namespace defkv::model
