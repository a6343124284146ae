#pragma once
#include <cstdint>

namespace gfpo {

enum LogitsDtype : int { kFloat32 = 0, kBFloat16 = 1 };

// Where each row of the logits starts, in elements: row n is (n / inner, n % inner) of a
// [outer, inner, V] view, so strided [B, T, V] slices such as logits[:, :-1] need no copy.
// The vocab dimension itself must be contiguous (stride 1).
struct RowLayout {
  std::int64_t inner;         // rows per outer index (T for [B, T, V], 1 for [N, V])
  std::int64_t stride_outer;  // elements between outer indices
  std::int64_t stride_inner;  // elements between consecutive inner rows
  std::int64_t offset(std::int64_t n) const { return (n / inner) * stride_outer + (n % inner) * stride_inner; }
};

// logits [n_rows, vocab] (layout above; float32 or bfloat16 by dtype), token_ids [n_rows] int64 in [0, vocab)
// (an id outside it is not dereferenced: its logp is NaN, and so is its gradient row in the backward)
// -> logp, lse [n_rows] float32 of z = logits * z_scale (z_scale = scale / temperature), or, when z_cap > 0,
// z = z_cap tanh(logits * z_scale / z_cap) (final-logit soft-capping; z_cap = cap / temperature), and entropy
// [n_rows] float32 when not null. Non-finite z (docs/semantics.md 2.4): -inf is probability 0; a row whose z holds
// a NaN or +inf, or is all -inf, gets NaN logp and entropy and a non-finite lse.
// active [n_rows] uint8 (null = every row active): rows with active[n] == 0 (masked tokens, whose log-probs
// a loss never uses) read neither their logits nor their token id and get logp = lse = entropy = 0.
void logprobs_forward(const void* logits, int dtype, std::int64_t n_rows, RowLayout layout, std::int64_t vocab,
                      const std::int64_t* token_ids, const std::uint8_t* active, float z_scale, float z_cap,
                      float* logp, float* lse, float* entropy, int n_threads);

// dL/dlogits [n_rows, vocab] in the logits dtype (z_scale, z_cap as in the forward), rows placed by grad_layout, from grad_logp [n_rows] and
// (when not null) grad_entropy [n_rows] with the entropy [n_rows] of the forward; null grads count as zeros.
// grad_logits may be logits itself (same layout): each row is read before it is overwritten. Rows whose
// grads are both zero are only zero-filled: their logits, token id, lse and entropy are not read (so they
// may be rows the forward skipped). A row whose lse is not finite (a bad row of the forward) is zero-filled too,
// whatever its grads.
void logprobs_backward(const void* logits, int dtype, std::int64_t n_rows, RowLayout layout, std::int64_t vocab,
                       const std::int64_t* token_ids, float z_scale, float z_cap, const float* lse,
                       const float* entropy, const float* grad_logp, const float* grad_entropy, void* grad_logits,
                       RowLayout grad_layout, int n_threads);

}  // namespace gfpo
