// Device helpers shared by the CUDA kernels: error checks, the device guard,
// widening vector loads of the logits dtypes and a clamped fast exp.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/dispatch.h"

namespace dfastllm::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dfastllm: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the launch and restores the caller's device,
// so torch's notion of the current device is left untouched.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

constexpr float kLog2e = 1.4426950408889634f;
// Lower clamp of every exp argument: fmaxf maps NaN and -inf here, and
// 2^(-104 * log2 e) = 2^-150 flushes to exactly 0, so such columns have
// exactly zero probability (as on the CPU).
constexpr float kExpFloor = -104.0f;
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// exp(d) for d <= 0, ~2 ulp; NaN and -inf give 0.
__device__ __forceinline__ float exp_clamped(float d) { return ex2_approx(fmaxf(d, kExpFloor) * kLog2e); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(BFloat16 v) { return __uint_as_float(uint32_t(v.bits) << 16); }
__device__ __forceinline__ float to_float(Half v) { return __half2float(__ushort_as_half(v.bits)); }

// kElems consecutive elements as floats: one 16-byte load when kAligned (the
// launcher checks the addresses), else element by element. The floats are
// the same either way.
template <typename T, int kElems, bool kAligned>
struct Loader {
  __device__ __forceinline__ static void load(const T* p, float* out) {
#pragma unroll
    for (int i = 0; i < kElems; ++i) out[i] = to_float(p[i]);
  }
};

template <>
struct Loader<float, 4, true> {
  __device__ __forceinline__ static void load(const float* p, float* out) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  }
};

template <>
struct Loader<BFloat16, 8, true> {
  __device__ __forceinline__ static void load(const BFloat16* p, float* out) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct Loader<Half, 8, true> {
  __device__ __forceinline__ static void load(const Half* p, float* out) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

template <typename T>
constexpr int kVecElems = 16 / int(sizeof(T));

}  // namespace dfastllm::cuda
