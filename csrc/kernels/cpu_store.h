// Narrowing stores for the CPU layer kernels, the counterpart of cpu_vec.h's
// widening loads: float -> bfloat16 / half with round-to-nearest-even, as
// torch converts (NaN stays NaN), written with the same vector extensions.
// Plus loads/stores of a row's last, partial vector (zero-filled).
#pragma once

#include <cstring>
#include <type_traits>

#include "kernels/cpu_vec.h"

namespace dfastllm::cpu {

// bfloat16 bits (in the low half of each lane), as c10::BFloat16 rounds.
inline VecU bf16_bits(VecF v) {
  const VecU b = reinterpret_cast<VecU>(v);
  const VecU rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return (b & 0x7fffffffu) > 0x7f800000u ? VecU{} + 0x7fc0u : rounded;
}

// IEEE half bits, round to nearest even, subnormals and overflow to inf
// included (F. Giesen's float_to_half_fast3_rtne, lane-wise).
inline VecU half_bits(VecF v) {
  VecU x = reinterpret_cast<VecU>(v);
  const VecU sign = x & 0x80000000u;
  x ^= sign;
  const VecU inf_nan = x > 0x7f800000u ? VecU{} + 0x7e00u : VecU{} + 0x7c00u;
  // Below 2^-14 the result is subnormal: adding 0.5 aligns its bits.
  const VecU subnormal = reinterpret_cast<VecU>(reinterpret_cast<VecF>(x) + splat(0.5f)) - 0x3f000000u;
  const VecU normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;  // rebias 127 -> 15, round
  const VecU bits = x >= 0x47800000u ? inf_nan : (x < 0x38800000u ? subnormal : normal);
  return bits | (sign >> 16);
}

inline void store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
inline void store(BFloat16* p, VecF v) {
  const VecH h = __builtin_convertvector(bf16_bits(v), VecH);
  std::memcpy(p, &h, sizeof h);
}
inline void store(Half* p, VecF v) {
  const VecH h = __builtin_convertvector(half_bits(v), VecH);
  std::memcpy(p, &h, sizeof h);
}

// Lanes of the vector starting at element i of a row of n elements.
inline int lanes_at(int64_t i, int64_t n) { return n - i < kLanes ? int(n - i) : kLanes; }

// count <= kLanes elements; the other lanes read as 0.
template <typename T>
inline VecF load_n(const T* p, int count) {
  if (count == kLanes) return load(p);
  T buf[kLanes] = {};
  std::memcpy(buf, p, sizeof(T) * count);
  return load(buf);
}

template <typename T>
inline void store_n(T* p, VecF v, int count) {
  if (count == kLanes) return store(p, v);
  T buf[kLanes];
  store(buf, v);
  std::memcpy(p, buf, sizeof(T) * count);
}

// v rounded to T's precision and widened back (what torch holds after an op in T).
template <typename T>
inline VecF round_to(VecF v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T buf[kLanes];
    store(buf, v);
    return load(buf);
  }
}

}  // namespace dfastllm::cpu
