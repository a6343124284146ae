// Per-token log-probs and entropies from logits on the CPU, forward and backward.
//
// For each row n (one token position) with y = logits[n, :] * scale / temperature, V = vocab, and z = y, or with
// final-logit soft-capping z = cap' tanh(y / cap') where cap' = cap / temperature (the model's
// cap tanh(scale logits / cap), then divided by the temperature):
//   lse_n     = log sum_v exp(z_v)
//   logp_n    = z_{y_n} - lse_n
//   entropy_n = lse_n - sum_v p_v z_v = log S - U / S,   p_v = exp(z_v - lse_n),
// where, relative to the running maximum m, S = sum_v exp(z_v - m) and U = sum_v exp(z_v - m) (z_v - m).
// Backward, with g = dL/dlogp_n and h = dL/dentropy_n (d log p_v = z_v - lse_n):
//   dL/dz_v      = g (1[v = y_n] - p_v) - h p_v (d log p_v + entropy_n)
//   dL/dlogits_v = dL/dz_v (scale / temperature) (1 - tanh^2(y_v / cap'))   (the last factor only when capped).
// The callers pass z_scale = scale / temperature and cap' (0: no cap). The soft-cap is computed in float32 from
// one exponential per logit (see softcap() below), in both passes: nothing capped is stored.
//
// Shapes and dtypes: logits [N, V] float32 or bfloat16 (any row strides, vocab contiguous), token_ids [N]
// int64 (an id outside [0, V) is never dereferenced: its logp and gradient row are NaN); logp, lse, entropy [N] float32; the gradient [N, V] in the logits dtype, placed by its own row
// layout (a new contiguous buffer, or the logits themselves). All math is float32.
// Non-finite z (docs/semantics.md 2.4, as the torch reference): -inf logits (banned tokens) contribute exactly 0,
// to the entropy too; a row with a NaN or +inf z, or only -inf ones, has NaN logp and entropy, a non-finite lse,
// and a zero gradient row (the backward tests lse once per row).
//
// Passes: the forward reads each row once: it walks the row in chunks that fit in L1, takes the chunk
// maximum, rescales the running sums to the new maximum (online logsumexp) and adds the chunk's
// exponentials from L1. The backward reads the row once and writes its gradient once, recomputing p_v
// from the saved lse; rows whose incoming gradients are all zero (masked tokens) are just zero-filled.
// Memory traffic per fp32 logit of an active token: 4 bytes read forward, 4 read + 4 written backward;
// a token the caller marks inactive (the fused loss: mask 0, i.e. padding and GFPO's dropped rows) costs
// nothing forward and 4 bytes written (zeros) backward, so a loss costs in proportion to its kept tokens. The torch reference
// makes several [N, V] fp32 passes and temporaries (z, softmax, gather/log-softmax grads): at N = 2048,
// V = 49152 its forward + backward peaks at ~5 [N, V] fp32 buffers (1.9 GiB), this one at the gradient.
// Rows are independent and each is reduced by one thread, so results do not depend on the thread count.
#include "logprobs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

namespace gfpo {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// 2048 floats (8 KiB) of scaled logits per chunk: re-read from L1 by the exponential pass.
constexpr std::int64_t kChunk = 2048;

// Below this, exp() is taken as 0: the true value, < 1.7e-38, is irrelevant next to a softmax
// denominator >= 1 (and to log-probability mass). Callers clamp their arguments to it with
// std::max(d, kExpFloor), one vector max that also turns -inf (a banned token) into a finite value,
// so that e * d below is 0 rather than 0 * -inf = NaN.
constexpr float kExpFloor = -87.0f;

// exp(x) for kExpFloor <= x <= 0 (NaN stays NaN), within ~2 ulp, as straight-line float arithmetic the
// compiler vectorises (std::exp is a library call that blocks vectorisation without -ffast-math, which
// this project avoids because it breaks NaN handling). x = n ln2 + r with |r| <= ln2/2, exp(r) by its
// Taylor series to degree 7 (truncation < 1e-8 relative), 2^n written into the exponent bits.
GFPO_INLINE float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 split in two so that n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer
  constexpr std::uint32_t kRoundBits = 0x4B400000u;
  const float shifted = x * kLog2e + kRound;  // n sits in the low mantissa bits
  const float n = shifted - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  std::uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - kRoundBits + 127u) << 23;  // 2^n for n in [-126, 0]; the unsigned wrap is intended
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

GFPO_INLINE float to_float(float v) { return v; }
GFPO_INLINE float to_float(std::uint16_t v) { return bf16_to_float(v); }
GFPO_INLINE void store(float* dst, float v) { *dst = v; }
GFPO_INLINE void store(std::uint16_t* dst, float v) { *dst = float_to_bf16(v); }

// cap tanh(y / cap) and its derivative 1 - tanh^2(y / cap) from one exponential e = exp(-2 |y| / cap):
// tanh = sign(y) (1 - e) / (1 + e), 1 - tanh^2 = 4 e / (1 + e)^2; two_over_cap = 2 / cap. Straight-line
// float arithmetic, so it vectorises like exp_nonpositive (std::tanh is a library call). Absolute error of
// the value ~cap * 2^-23 (1 - e cancels for small |y|); +-inf gives +-cap as torch.tanh does; NaN stays NaN.
struct Capped {
  float value, slope;
};
GFPO_INLINE Capped softcap(float y, float cap, float two_over_cap) {
  const float e = exp_nonpositive(std::max(-std::fabs(y) * two_over_cap, kExpFloor));
  const float inv = 1.0f / (1.0f + e);
  return {std::copysign((1.0f - e) * inv, y) * cap, 4.0f * e * inv * inv};
}

struct RowResult {
  float logp, lse, entropy;
};

// z_v = x_v * inv_t, then soft-capped at cap (in z units) when kCap.
template <bool kCap>
GFPO_INLINE float scaled(float x, float inv_t, float cap, float two_over_cap) {
  return kCap ? softcap(x * inv_t, cap, two_over_cap).value : x * inv_t;
}

template <typename T, bool kEntropy, bool kCap>
GFPO_INLINE RowResult forward_row(const T* x, std::int64_t vocab, std::int64_t target, float inv_t, float cap) {
  alignas(64) float z[kChunk];
  const float two_over_cap = kCap ? 2.0f / cap : 0.0f;
  float m = -kInf, S = 0.0f, U = 0.0f;
  for (std::int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
    const std::int64_t n = std::min(kChunk, vocab - c0);
    float cmax = -kInf;
#pragma omp simd reduction(max : cmax)
    for (std::int64_t i = 0; i < n; ++i) {
      z[i] = scaled<kCap>(to_float(x[c0 + i]), inv_t, cap, two_over_cap);
      cmax = std::max(cmax, z[i]);
    }
    if (cmax > m) {
      if (S > 0.0f) {  // rescale the sums to the new maximum: exp(z - m) = exp(z - m') exp(m' - m)
        const float alpha = std::exp(m - cmax);
        U = alpha * (U + (m - cmax) * S);
        S *= alpha;
      }
      m = cmax;
    }
    // Every element goes through the sums, so that a NaN anywhere reaches S (the max above may skip it); a
    // finite shift while every logit so far is -inf (-inf - -inf would be NaN): those give e = 0.
    const float shift = m == -kInf ? 0.0f : m;
    float s = 0.0f, u = 0.0f;
#pragma omp simd reduction(+ : s, u)
    for (std::int64_t i = 0; i < n; ++i) {
      const float d_raw = z[i] - shift;
      const float d = std::max(d_raw, kExpFloor);
      const float e = d_raw < kExpFloor ? 0.0f : exp_nonpositive(d);
      s += e;
      if (kEntropy) u += e * d;
    }
    S += s;
    U += u;
  }
  const float log_s = std::log(S);
  const float lse = m + log_s;
  // Bad rows (docs/semantics.md 2.4) need no test here: a NaN or +inf z makes S, so lse, logp and the entropy
  // NaN, and a row of -inf gives S = 0, lse = -inf and NaN logp and entropy (-inf - -inf, 0 / 0). So lse is
  // finite exactly on the good rows, which is the backward's per-row test.
  // An id outside [0, vocab) is never dereferenced: its log-prob is NaN (the Python ops reject such ids first).
  const float z_y = target >= 0 && target < vocab ? scaled<kCap>(to_float(x[target]), inv_t, cap, two_over_cap) : kNaN;
  return {z_y - lse, lse, kEntropy ? log_s - U / S : 0.0f};
}

template <typename T, bool kEntropy, bool kCap>
GFPO_INLINE void backward_row(const T* x, T* grad, std::int64_t vocab, std::int64_t target, float inv_t, float cap,
                              float lse, float entropy, float g, float h) {
  if (target < 0 || target >= vocab) {  // no one-hot column: NaN, not a silently wrong gradient
    for (std::int64_t v = 0; v < vocab; ++v) store(grad + v, kNaN);
    return;
  }
  const float a = g * inv_t;  // fold scale/temperature into the two coefficients
  const float b = h * inv_t;
  const float two_over_cap = kCap ? 2.0f / cap : 0.0f;
  // The target column, whole, in float32: g (1 - p) rather than (-g p) + g rounded in between. Computed
  // first because grad may alias x.
  const Capped c_y = kCap ? softcap(to_float(x[target]) * inv_t, cap, two_over_cap)
                           : Capped{to_float(x[target]) * inv_t, 1.0f};
  const float d_y = std::max(c_y.value - lse, kExpFloor);
  const float p_y = exp_nonpositive(d_y);  // the target is never banned: no floor test
  const float grad_y = (a * (1.0f - p_y) - (kEntropy ? p_y * b * (d_y + entropy) : 0.0f)) * c_y.slope;
#pragma omp simd
  for (std::int64_t v = 0; v < vocab; ++v) {
    const Capped c = kCap ? softcap(to_float(x[v]) * inv_t, cap, two_over_cap) : Capped{to_float(x[v]) * inv_t, 1.0f};
    const float d_raw = c.value - lse;  // log p_v
    const float d = std::max(d_raw, kExpFloor);
    const float p = d_raw < kExpFloor ? 0.0f : exp_nonpositive(d);
    store(grad + v, (kEntropy ? -p * (a + b * (d + entropy)) : -p * a) * c.slope);
  }
  store(grad + target, grad_y);
}

// One entry point per (dtype, entropy, soft-cap) so that GFPO_SIMD_CLONES can compile each for AVX2 + FMA.
#define GFPO_ROW_KERNELS(NAME, T, ENT, CAP)                                                                    \
  GFPO_SIMD_CLONES RowResult forward_##NAME(const T* x, std::int64_t vocab, std::int64_t y, float inv_t,      \
                                            float cap) {                                                       \
    return forward_row<T, ENT, CAP>(x, vocab, y, inv_t, cap);                                                  \
  }                                                                                                            \
  GFPO_SIMD_CLONES void backward_##NAME(const T* x, T* grad, std::int64_t vocab, std::int64_t y, float inv_t,   \
                                        float cap, float lse, float entropy, float g, float h) {               \
    backward_row<T, ENT, CAP>(x, grad, vocab, y, inv_t, cap, lse, entropy, g, h);                              \
  }
GFPO_ROW_KERNELS(f32, float, false, false)
GFPO_ROW_KERNELS(f32_entropy, float, true, false)
GFPO_ROW_KERNELS(bf16, std::uint16_t, false, false)
GFPO_ROW_KERNELS(bf16_entropy, std::uint16_t, true, false)
GFPO_ROW_KERNELS(f32_cap, float, false, true)
GFPO_ROW_KERNELS(f32_entropy_cap, float, true, true)
GFPO_ROW_KERNELS(bf16_cap, std::uint16_t, false, true)
GFPO_ROW_KERNELS(bf16_entropy_cap, std::uint16_t, true, true)
#undef GFPO_ROW_KERNELS

using ForwardFn = RowResult (*)(const void*, std::int64_t, std::int64_t, float, float);
using BackwardFn = void (*)(const void*, void*, std::int64_t, std::int64_t, float, float, float, float, float, float);

// The row kernel of one (dtype, entropy, cap) combination, typed through void pointers.
template <typename T, RowResult (*F)(const T*, std::int64_t, std::int64_t, float, float)>
RowResult forward_erased(const void* x, std::int64_t vocab, std::int64_t y, float inv_t, float cap) {
  return F(static_cast<const T*>(x), vocab, y, inv_t, cap);
}
template <typename T, void (*F)(const T*, T*, std::int64_t, std::int64_t, float, float, float, float, float, float)>
void backward_erased(const void* x, void* grad, std::int64_t vocab, std::int64_t y, float inv_t, float cap, float lse,
                     float entropy, float g, float h) {
  F(static_cast<const T*>(x), static_cast<T*>(grad), vocab, y, inv_t, cap, lse, entropy, g, h);
}

ForwardFn pick_forward(int dtype, bool entropy, bool cap) {
  using B = std::uint16_t;
  static const ForwardFn table[2][2][2] = {
      {{forward_erased<float, forward_f32>, forward_erased<float, forward_f32_cap>},
       {forward_erased<float, forward_f32_entropy>, forward_erased<float, forward_f32_entropy_cap>}},
      {{forward_erased<B, forward_bf16>, forward_erased<B, forward_bf16_cap>},
       {forward_erased<B, forward_bf16_entropy>, forward_erased<B, forward_bf16_entropy_cap>}}};
  return table[dtype == kBFloat16][entropy][cap];
}

BackwardFn pick_backward(int dtype, bool entropy, bool cap) {
  using B = std::uint16_t;
  static const BackwardFn table[2][2][2] = {
      {{backward_erased<float, backward_f32>, backward_erased<float, backward_f32_cap>},
       {backward_erased<float, backward_f32_entropy>, backward_erased<float, backward_f32_entropy_cap>}},
      {{backward_erased<B, backward_bf16>, backward_erased<B, backward_bf16_cap>},
       {backward_erased<B, backward_bf16_entropy>, backward_erased<B, backward_bf16_entropy_cap>}}};
  return table[dtype == kBFloat16][entropy][cap];
}

}  // namespace

void logprobs_forward(const void* logits, int dtype, std::int64_t n_rows, RowLayout layout, std::int64_t vocab,
                      const std::int64_t* token_ids, const std::uint8_t* active, float z_scale, float z_cap,
                      float* logp, float* lse, float* entropy, int n_threads) {
  const std::int64_t elem = dtype == kBFloat16 ? 2 : 4;
  const char* base = static_cast<const char*>(logits);
  const ForwardFn row_fn = pick_forward(dtype, entropy != nullptr, z_cap > 0.0f);
  // Dynamic scheduling: inactive rows come in runs (a dropped sequence is T of them), which a static split
  // would hand to one thread while the other reads every active row.
#pragma omp parallel for schedule(dynamic, 4) num_threads(n_threads)
  for (std::int64_t n = 0; n < n_rows; ++n) {
    RowResult r{0.0f, 0.0f, 0.0f};
    if (active == nullptr || active[n] != 0) {
      r = row_fn(base + layout.offset(n) * elem, vocab, token_ids[n], z_scale, z_cap);
    }
    logp[n] = r.logp;
    lse[n] = r.lse;
    if (entropy != nullptr) entropy[n] = r.entropy;
  }
}

void logprobs_backward(const void* logits, int dtype, std::int64_t n_rows, RowLayout layout, std::int64_t vocab,
                       const std::int64_t* token_ids, float z_scale, float z_cap, const float* lse,
                       const float* entropy, const float* grad_logp, const float* grad_entropy, void* grad_logits,
                       RowLayout grad_layout, int n_threads) {
  const std::int64_t elem = dtype == kBFloat16 ? 2 : 4;
  const char* base = static_cast<const char*>(logits);
  char* out_base = static_cast<char*>(grad_logits);
  const bool capped = z_cap > 0.0f;
  const BackwardFn plain = pick_backward(dtype, false, capped);
  const BackwardFn with_entropy = pick_backward(dtype, true, capped);
  // Dynamic scheduling: zero-gradient rows (masked tokens, dropped sequences) cost a memset only.
#pragma omp parallel for schedule(dynamic, 4) num_threads(n_threads)
  for (std::int64_t n = 0; n < n_rows; ++n) {
    const float g = grad_logp != nullptr ? grad_logp[n] : 0.0f;
    const float h = grad_entropy != nullptr ? grad_entropy[n] : 0.0f;
    char* out = out_base + grad_layout.offset(n) * elem;
    // Zero rows: no incoming gradient (masked tokens), or a bad row (lse not finite, docs/semantics.md 2.4), whose
    // gradient is 0 whatever g and h are.
    if ((g == 0.0f && h == 0.0f) || !std::isfinite(lse[n])) {
      std::memset(out, 0, static_cast<std::size_t>(vocab * elem));
      continue;
    }
    const float ent = entropy != nullptr ? entropy[n] : 0.0f;
    (h != 0.0f ? with_entropy : plain)(base + layout.offset(n) * elem, out, vocab, token_ids[n], z_scale, z_cap,
                                       lse[n], ent, g, h);
  }
}

}  // namespace gfpo
