#pragma once
#include <cstdint>

namespace gfpo {

enum ScaleMode : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// rewards [n, f] float32 (NaN = missing), weights [f] float32 -> out [n] float32 advantages.
// Same semantics as gfpo_fast.advantages.group_advantages_ref (statistics in float64).
void group_advantages(const float* rewards, std::int64_t n, std::int64_t f, const float* weights,
                      std::int64_t group, int scale_mode, bool normalize_then_sum, float* out);

// rewards [n], scores [n] float32; keeps the top-k scores of each group (ties: lower index).
// out_adv [n] float32, out_keep [n] uint8 (bool).
void gfpo_filter(const float* rewards, const float* scores, std::int64_t n, std::int64_t group, std::int64_t k,
                 int scale_mode, float* out_adv, std::uint8_t* out_keep);

}  // namespace gfpo
