// Group-relative advantages and the GFPO top-k filter on the CPU (TRL semantics,
// docs/semantics.md sections 3 and 12): NaN-aware means, Bessel std, A = (r - mean) / (std + 1e-4),
// NaN advantages -> 0. Reductions run in float64 over float32 inputs.
#include "advantages.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace gfpo {
namespace {

constexpr double kStdEps = 1e-4;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Stats {
  double mean = kNaN;
  double std = kNaN;  // unbiased; NaN with fewer than two finite values
};

// Mean and unbiased std of x[0], x[stride], ... (count values), skipping NaN.
Stats nan_stats(const double* x, std::int64_t count, std::int64_t stride = 1) {
  double sum = 0.0;
  std::int64_t c = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    double v = x[i * stride];
    if (!std::isnan(v)) {
      sum += v;
      ++c;
    }
  }
  Stats s;
  if (c == 0) return s;
  s.mean = sum / c;
  if (c < 2) return s;
  double sq = 0.0;
  for (std::int64_t i = 0; i < count; ++i) {
    double v = x[i * stride];
    if (!std::isnan(v)) sq += (v - s.mean) * (v - s.mean);
  }
  s.std = std::sqrt(sq / (c - 1));
  return s;
}

inline float finite_or_zero(double v) { return std::isnan(v) ? 0.0f : static_cast<float>(v); }

// Weighted NaN-skipping sum of each row of an [n, f] matrix; NaN where a row is all NaN.
std::vector<double> weighted_sum(const double* r, std::int64_t n, std::int64_t f, const float* w) {
  std::vector<double> out(n);
  for (std::int64_t i = 0; i < n; ++i) {
    double total = 0.0;
    bool any = false;
    for (std::int64_t j = 0; j < f; ++j) {
      double v = r[i * f + j];
      if (!std::isnan(v)) {
        total += static_cast<double>(w[j]) * v;
        any = true;
      }
    }
    out[i] = any ? total : kNaN;
  }
  return out;
}

}  // namespace

void group_advantages(const float* rewards, std::int64_t n, std::int64_t f, const float* weights,
                      std::int64_t group, int scale_mode, bool normalize_then_sum, float* out) {
  std::vector<double> r(rewards, rewards + n * f);
  const std::int64_t num_groups = n / group;
  if (normalize_then_sum) {
    // z-score each reward function within its group, sum with weights, then a batch baseline and std.
    for (std::int64_t g = 0; g < num_groups; ++g) {
      for (std::int64_t j = 0; j < f; ++j) {
        double* col = r.data() + g * group * f + j;
        Stats s = nan_stats(col, group, f);
        double std = group > 1 ? s.std : 0.0;
        for (std::int64_t i = 0; i < group; ++i) col[i * f] = (col[i * f] - s.mean) / (std + kStdEps);
      }
    }
    std::vector<double> total = weighted_sum(r.data(), n, f, weights);
    Stats s = nan_stats(total.data(), n);
    for (std::int64_t i = 0; i < n; ++i) out[i] = finite_or_zero((total[i] - s.mean) / (s.std + kStdEps));
    return;
  }
  std::vector<double> total = weighted_sum(r.data(), n, f, weights);
  double batch_std = n > 1 ? nan_stats(total.data(), n).std : 0.0;
  for (std::int64_t g = 0; g < num_groups; ++g) {
    const double* x = total.data() + g * group;
    Stats s = nan_stats(x, group);
    double std = scale_mode == kScaleBatch ? batch_std : (group > 1 ? s.std : 0.0);
    for (std::int64_t i = 0; i < group; ++i) {
      double a = x[i] - s.mean;
      if (scale_mode != kScaleNone) a /= std + kStdEps;
      out[g * group + i] = finite_or_zero(a);
    }
  }
}

void gfpo_filter(const float* rewards, const float* scores, std::int64_t n, std::int64_t group, std::int64_t k,
                 int scale_mode, float* out_adv, std::uint8_t* out_keep) {
  const std::int64_t num_groups = n / group;
  std::vector<double> kept(n, kNaN);
  std::vector<std::int64_t> order(group);
  for (std::int64_t g = 0; g < num_groups; ++g) {
    const std::int64_t base = g * group;
    std::iota(order.begin(), order.end(), 0);
    // Highest score first; equal scores keep index order, like a stable descending sort.
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int64_t a, std::int64_t b) { return scores[base + a] > scores[base + b]; });
    for (std::int64_t i = 0; i < group; ++i) out_keep[base + i] = 0;
    for (std::int64_t i = 0; i < k; ++i) {
      out_keep[base + order[i]] = 1;
      kept[base + order[i]] = rewards[base + order[i]];
    }
  }
  double batch_std = nan_stats(kept.data(), n).std;
  for (std::int64_t g = 0; g < num_groups; ++g) {
    const double* x = kept.data() + g * group;
    Stats s = nan_stats(x, group);
    double std = scale_mode == kScaleBatch ? batch_std : s.std;
    for (std::int64_t i = 0; i < group; ++i) {
      double a = x[i] - s.mean;
      if (scale_mode != kScaleNone) a /= std + kStdEps;
      out_adv[g * group + i] = out_keep[g * group + i] ? finite_or_zero(a) : 0.0f;
    }
  }
}

}  // namespace gfpo
