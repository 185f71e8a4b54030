// commit_tokens on CUDA: one block per sequence, no host synchronisation.
//
// The block first snapshots which candidates are still masked (into the
// caller's scratch array, so later writes into the canvas cannot change the
// decision), then ranks them: a candidate's rank is the number of eligible
// candidates that beat it (higher confidence, ties to the lower index),
// counted over tiles staged in shared memory - O(n^2 / threads) for the
// n candidates of one step, a few hundred at most in practice.
// Semantics: dfastllm/ops/reference.py.
#include <climits>

#include "kernels/cuda_common.cuh"
#include "kernels/params.h"

namespace dfastllm {
namespace cuda {
namespace {

constexpr int kCommitThreads = 256;

// Ranking key: confidence with NaN as -inf; NaN marks "not eligible", which
// loses every comparison.
__device__ __forceinline__ float rank_key(const CommitTokensParams& p, long long j) {
  if (!p.eligible[j]) return __int_as_float(0x7fc00000);
  const float c = p.confidence[j];
  return isnan(c) ? kNegInf : c;
}

__device__ __forceinline__ bool beats(float key_a, long long a, float key_b, long long b) {
  return key_a > key_b || (key_a == key_b && a < b);
}

__global__ void __launch_bounds__(kCommitThreads) commit_tokens_kernel(const CommitTokensParams p) {
  __shared__ float tile_keys[kCommitThreads];
  __shared__ int count;
  __shared__ float best_keys[kCommitThreads / 32];
  __shared__ long long best_index[kCommitThreads / 32];

  const long long b = blockIdx.x;
  const long long lo = min(max((long long)p.cand_offsets[b], 0LL), (long long)p.n_cand);
  const long long hi = min(max((long long)p.cand_offsets[b + 1], lo), (long long)p.n_cand);
  int64_t* row = p.canvas + b * p.canvas_stride;

  for (long long j = lo + threadIdx.x; j < hi; j += kCommitThreads) {
    const int64_t pos = p.cand_positions[j];
    p.eligible[j] = pos >= 0 && pos < p.length && row[pos] == p.mask_id;
  }
  if (threadIdx.x == 0) count = 0;
  __syncthreads();

  const float threshold = p.threshold[b];
  if (threshold > 0.0f) {
    float my_key = __int_as_float(0x7fc00000);
    long long my_best = LLONG_MAX;
    for (long long j = lo + threadIdx.x; j < hi; j += kCommitThreads) {
      const float key = rank_key(p, j);
      if (!p.eligible[j]) continue;
      if (my_best == LLONG_MAX || beats(key, j, my_key, my_best)) my_key = key, my_best = j;
      if (key >= threshold) {
        row[p.cand_positions[j]] = p.tokens[j];
        atomicAdd(&count, 1);
      }
    }
    // Best eligible candidate of the block, in case none reached the threshold.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float k2 = __shfl_xor_sync(0xffffffffu, my_key, o);
      const long long i2 = __shfl_xor_sync(0xffffffffu, my_best, o);
      if (i2 != LLONG_MAX && (my_best == LLONG_MAX || beats(k2, i2, my_key, my_best))) my_key = k2, my_best = i2;
    }
    if ((threadIdx.x & 31) == 0) best_keys[threadIdx.x >> 5] = my_key, best_index[threadIdx.x >> 5] = my_best;
    __syncthreads();
    if (threadIdx.x == 0 && count == 0) {
      long long best = LLONG_MAX;
      float key = 0.0f;
      for (int w = 0; w < kCommitThreads / 32; ++w) {
        const long long i = best_index[w];
        if (i != LLONG_MAX && (best == LLONG_MAX || beats(best_keys[w], i, key, best))) key = best_keys[w], best = i;
      }
      if (best != LLONG_MAX) {
        row[p.cand_positions[best]] = p.tokens[best];
        count = 1;
      }
    }
  } else {
    const int k = p.k[b];
    for (long long base = lo; base < hi; base += kCommitThreads) {  // uniform trip count
      const long long j = base + threadIdx.x;
      const float my_key = j < hi ? rank_key(p, j) : __int_as_float(0x7fc00000);
      int rank = 0;
      for (long long tile = lo; tile < hi; tile += kCommitThreads) {
        __syncthreads();
        const long long i = tile + threadIdx.x;
        tile_keys[threadIdx.x] = i < hi ? rank_key(p, i) : __int_as_float(0x7fc00000);
        __syncthreads();
        const int n = int(min((long long)kCommitThreads, hi - tile));
        for (int t = 0; t < n; ++t) rank += beats(tile_keys[t], tile + t, my_key, j);
      }
      if (j < hi && p.eligible[j] && rank < k) {
        row[p.cand_positions[j]] = p.tokens[j];
        atomicAdd(&count, 1);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) p.committed[b] = count;
}

}  // namespace
}  // namespace cuda

void commit_tokens_cuda(const CommitTokensParams& p) {
  if (p.batch > INT_MAX) throw std::invalid_argument("commit_tokens: batch must be < 2^31 on CUDA");
  cuda::DeviceGuard guard(p.device);
  cuda::commit_tokens_kernel<<<unsigned(p.batch), cuda::kCommitThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  cuda::check(cudaGetLastError(), "commit_tokens kernel launch");
}

}  // namespace dfastllm
