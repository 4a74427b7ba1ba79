// DefensiveKV and Layer-DefensiveKV (spec §4, §5; "Taming the Fragility of KV Cache Eviction",
// ICLR 2026). The scoring is split into steps so tests can check each against spec §4.5 and the
// oracles of spec §11.
#pragma once

#include "core/press/press.h"

namespace defkv::press::defensive {

// Steps (c)-(d) on window attention A [H_q, w, n]: every row is average-pooled and rescaled to
// keep its mass, the maximum is taken over the window queries and the GQA group (M), and M is
// clamped from below by its per-head mean (mu). Returns S = max(M, mu) as [H_kv, n]; M and mu
// are written to the optional outputs.
at::Tensor DefensiveAggregate(const at::Tensor& attn, int64_t num_kv_heads, int64_t kernel_size,
                              at::Tensor* m_out = nullptr, at::Tensor* mu_out = nullptr);

// Step (f): per kv head, the tokens with the largest normalised raw attention p (sorted
// descending) strictly before the cumulative mass first reaches tau - beta, at most `cap`
// (clamped to >= 0: the reference's negative cap is a Python slicing accident). abar: [H_kv, n].
HeadSelection StageOneProtected(const at::Tensor& abar, double tau, double beta, int64_t cap);

// The full layer score of steps (a)-(g): [H_kv, L], window and stage-1 entries at the layer's
// S_max.
at::Tensor LayerScores(const LayerInputs& in, int64_t window, int64_t kernel_size, double tau);

}  // namespace defkv::press::defensive
