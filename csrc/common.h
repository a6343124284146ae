// Shared helpers of the C++ CPU backend. Tensors cross from Python as raw addresses
// (torch's data_ptr()) plus sizes: the Python side checks device, dtype and contiguity,
// so nothing here links against torch.
#pragma once

#include <cstdint>
#include <cstring>

// Hot row kernels are compiled twice on x86-64 with GCC or clang: once for the build's default
// target (portable SSE2) and once for x86-64-v3 (AVX2 + FMA, 8 float lanes). The loader picks one
// per process from the CPU it runs on (an ifunc, hence glibc only), so one build is both portable
// and fast on AVX2. Define GFPO_NO_SIMD_CLONES to build the default target only.
#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(GFPO_NO_SIMD_CLONES)
#define GFPO_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GFPO_SIMD_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define GFPO_INLINE inline __attribute__((always_inline))
#else
#define GFPO_INLINE inline
#endif

namespace gfpo {

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// bfloat16 is the upper half of an IEEE float32.
GFPO_INLINE float bf16_to_float(std::uint16_t v) {
  std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

GFPO_INLINE std::uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept NaN
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

}  // namespace gfpo
