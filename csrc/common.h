// Shared helpers of the C++ CPU backend. Tensors cross from Python as raw addresses
// (torch's data_ptr()) plus sizes: the Python side checks device, dtype and contiguity,
// so nothing here links against torch.
#pragma once

#include <cstdint>
#include <cstring>

namespace gfpo {

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// bfloat16 is the upper half of an IEEE float32.
inline float bf16_to_float(std::uint16_t v) {
  std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline std::uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept NaN
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

}  // namespace gfpo
