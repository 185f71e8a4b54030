// Narrowing stores for the CUDA layer kernels (the counterpart of
// cuda_common.cuh's to_float): float -> T with round-to-nearest-even, and a
// block-wide sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda_common.cuh"

namespace dfastllm::cuda {

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(BFloat16* p, float v) {
  p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ void store(Half* p, float v) { p->bits = __half_as_ushort(__float2half_rn(v)); }

// v rounded to T's precision (what torch holds after an op in T).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  T t;
  store(&t, v);
  return to_float(t);
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int n_warps = blockDim.x >> 5;
  v = lane < n_warps ? warp_sums[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace dfastllm::cuda
