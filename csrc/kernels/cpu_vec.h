// Float vectors for the CPU kernels, written with GCC/Clang vector
// extensions so one source compiles to AVX-512, AVX2 or SSE (and NEON)
// without intrinsics. Only what the kernels need: widening loads of the
// three logits dtypes and a fast exp for non-positive arguments.
//
// NaN handling is deliberate: every max/clamp is written `x > m ? x : m`, so
// a NaN input loses the comparison and never reaches a maximum or a sum.
// Do not build this with -ffast-math (it would drop those semantics).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels/dispatch.h"

namespace dfastllm::cpu {

// One vector is one hardware register: GCC lowers wider vector types'
// selects element by element, which is 20x slower.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE2, NEON
#endif
typedef float VecF __attribute__((vector_size(kLanes * 4)));
typedef int32_t VecI __attribute__((vector_size(kLanes * 4)));
typedef uint32_t VecU __attribute__((vector_size(kLanes * 4)));
typedef uint16_t VecH __attribute__((vector_size(kLanes * 2)));

inline VecF splat(float v) { return VecF{} + v; }

// Widening loads of kLanes consecutive elements (unaligned).
inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__AVX512F__)
// GCC splits the generic widening below into five instructions; one
// vpmovzxwd / vcvtph2ps from memory is what the hardware offers.
inline VecF load(const BFloat16* p) {
  // maskz forms: GCC 12's unmasked ones trip -Wmaybe-uninitialized in its own header.
  const __m512i w = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<VecF>(reinterpret_cast<VecU>(w) << 16);
}

inline VecF load(const Half* p) {
  return reinterpret_cast<VecF>(_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
#else
inline VecF load(const BFloat16* p) {
  VecH h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<VecF>(__builtin_convertvector(h, VecU) << 16);
}

inline VecF load(const Half* p) {
  VecH h;
  std::memcpy(&h, p, sizeof h);
  const VecU w = __builtin_convertvector(h, VecU);
  const VecU sign = (w & 0x8000u) << 16;
  const VecU exp_mant = w & 0x7fffu;
  // Rebias by scaling: exact for normal and subnormal halves.
  VecU bits = reinterpret_cast<VecU>(reinterpret_cast<VecF>(exp_mant << 13) * splat(0x1p112f));
  bits = exp_mant >= 0x7c00u ? ((exp_mant << 13) | 0x7f800000u) : bits;  // inf, NaN
  return reinterpret_cast<VecF>(bits | sign);
}
#endif

// The bit pattern of -inf in each storage type, to pad a row's last vector.
template <typename T> struct NegInf;
template <> struct NegInf<float> { static float value() { return -__builtin_inff(); } };
template <> struct NegInf<BFloat16> { static BFloat16 value() { return BFloat16{0xff80}; } };
template <> struct NegInf<Half> { static Half value() { return Half{0xfc00}; } };

// Loads count (< kLanes allowed) elements, the rest read as -inf.
template <typename T>
inline VecF load_partial(const T* p, int count) {
  if (count == kLanes) return load(p);
  T buf[kLanes];
  for (int i = 0; i < kLanes; ++i) buf[i] = i < count ? p[i] : NegInf<T>::value();
  return load(buf);
}

inline float to_float(float v) { return v; }
inline float to_float(BFloat16 v) {
  const uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(Half v) {
  const uint32_t exp_mant = v.bits & 0x7fffu, shifted = exp_mant << 13;
  float f;
  std::memcpy(&f, &shifted, 4);
  f *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (exp_mant >= 0x7c00u) bits = shifted | 0x7f800000u;
  bits |= uint32_t(v.bits & 0x8000u) << 16;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Lower clamp of every exp argument: NaN and -inf map here and give exactly
// 0, since exp_nonpositive flushes results below 2^-126 to zero.
constexpr float kExpFloor = -104.0f;

inline VecF clamp_exp_arg(VecF d) { return d > splat(kExpFloor) ? d : splat(kExpFloor); }

// exp(d) for kExpFloor <= d <= 0, relative error ~2e-7 (Cephes expf
// polynomial, Cody-Waite reduction); 0 where the result would be below
// 2^-126, which the sums cannot see and which keeps -inf columns at exactly
// zero probability.
inline VecF exp_nonpositive(VecF d) {
  // Round to nearest by the 1.5 * 2^23 trick (valid for |t| < 2^22).
  const VecF n = (d * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
  VecF r = d - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  VecF poly = splat(1.9875691500e-4f);
  poly = poly * r + splat(1.3981999507e-3f);
  poly = poly * r + splat(8.3334519073e-3f);
  poly = poly * r + splat(4.1665795894e-2f);
  poly = poly * r + splat(1.6666665459e-1f);
  poly = poly * r + splat(5.0000001201e-1f);
  poly = poly * (r * r) + r + splat(1.0f);
  VecI biased = __builtin_convertvector(n, VecI) + 127;
  const VecI zero{};
  biased = biased > zero ? biased : zero;  // 2^n with n <= -127 -> 0.0f
  return poly * reinterpret_cast<VecF>(biased << 23);
}

inline float exp_nonpositive(float d) {
  const VecF v = exp_nonpositive(clamp_exp_arg(splat(d)));
  return v[0];
}

inline float reduce_add(VecF v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline float reduce_max(VecF v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

}  // namespace dfastllm::cpu
