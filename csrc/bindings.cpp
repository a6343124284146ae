// pybind11 module gfpo_fast._C: the C++ CPU backend. Every function takes tensor addresses
// (uintptr) and sizes; gfpo_fast/cpu/*.py checks device, dtype and contiguity before calling.
#include <pybind11/pybind11.h>

#include "advantages.h"
#include "common.h"
#include "logprobs.h"

namespace py = pybind11;
using gfpo::ptr;
using std::int64_t;
using std::uintptr_t;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gfpo-fast C++ CPU backend (pybind11, no torch linkage)";
  // Digest of the csrc/ sources this module was built from (setup.py): a checkout warns when it differs.
  m.attr("csrc_digest") = GFPO_CSRC_DIGEST;

  m.def(
      "group_advantages",
      [](uintptr_t rewards, int64_t n, int64_t f, uintptr_t weights, int64_t group, int scale_mode,
         bool normalize_then_sum, uintptr_t out) {
        py::gil_scoped_release release;
        gfpo::group_advantages(ptr<const float>(rewards), n, f, ptr<const float>(weights), group, scale_mode,
                               normalize_then_sum, ptr<float>(out));
      },
      "rewards [n, f] f32, weights [f] f32 -> out [n] f32");

  m.def(
      "gfpo_filter",
      [](uintptr_t rewards, uintptr_t scores, int64_t n, int64_t group, int64_t k, int scale_mode, uintptr_t adv,
         uintptr_t keep) {
        py::gil_scoped_release release;
        gfpo::gfpo_filter(ptr<const float>(rewards), ptr<const float>(scores), n, group, k, scale_mode,
                          ptr<float>(adv), ptr<std::uint8_t>(keep));
      },
      "rewards [n] f32, scores [n] f32 -> adv [n] f32, keep [n] u8");

  m.def(
      "logprobs_forward",
      [](uintptr_t logits, int dtype, int64_t n_rows, int64_t inner, int64_t stride_outer, int64_t stride_inner,
         int64_t vocab, uintptr_t token_ids, uintptr_t active, float z_scale, float z_cap, uintptr_t logp,
         uintptr_t lse, uintptr_t entropy, int n_threads) {
        py::gil_scoped_release release;
        gfpo::logprobs_forward(ptr<const void>(logits), dtype, n_rows, {inner, stride_outer, stride_inner}, vocab,
                               ptr<const int64_t>(token_ids), ptr<const std::uint8_t>(active), z_scale, z_cap,
                               ptr<float>(logp), ptr<float>(lse), ptr<float>(entropy), n_threads);
      },
      "logits rows (f32 or bf16 by dtype, row n at (n // inner) * stride_outer + (n % inner) * stride_inner), "
      "token_ids [n_rows] i64, z = logits * z_scale (soft-capped at z_cap when > 0), active [n_rows] u8 (0 = all active; inactive rows are not read and get zeros) "
      "-> logp, lse [n_rows] f32, entropy [n_rows] f32 unless its address is 0");

  m.def(
      "logprobs_backward",
      [](uintptr_t logits, int dtype, int64_t n_rows, int64_t inner, int64_t stride_outer, int64_t stride_inner,
         int64_t vocab, uintptr_t token_ids, float z_scale, float z_cap, uintptr_t lse, uintptr_t entropy,
         uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t grad_logits, int64_t grad_inner,
         int64_t grad_stride_outer, int64_t grad_stride_inner, int n_threads) {
        py::gil_scoped_release release;
        gfpo::logprobs_backward(ptr<const void>(logits), dtype, n_rows, {inner, stride_outer, stride_inner}, vocab,
                                ptr<const int64_t>(token_ids), z_scale, z_cap, ptr<const float>(lse),
                                ptr<const float>(entropy), ptr<const float>(grad_logp),
                                ptr<const float>(grad_entropy), ptr<void>(grad_logits),
                                {grad_inner, grad_stride_outer, grad_stride_inner}, n_threads);
      },
      "same logits layout; lse, entropy, grad_logp, grad_entropy [n_rows] f32 (0 = absent) -> grad_logits "
      "[n_rows, vocab] in the logits dtype, rows placed by the grad_* layout (may alias logits)");
}
