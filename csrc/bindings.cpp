// pybind11 module gfpo_fast._C: the C++ CPU backend. Every function takes tensor addresses
// (uintptr) and sizes; gfpo_fast/cpu/*.py checks device, dtype and contiguity before calling.
#include <pybind11/pybind11.h>

#include "advantages.h"
#include "common.h"

namespace py = pybind11;
using gfpo::ptr;
using std::int64_t;
using std::uintptr_t;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gfpo-fast C++ CPU backend (pybind11, no torch linkage)";

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
}
