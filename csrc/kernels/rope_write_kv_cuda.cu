// rope_write_kv on CUDA: one block per token; its threads take the rotation
// pairs (x[j], x[j + D/2]) of every q and k head, then the v elements.
// Products and sums are rounded explicitly (__fmul_rn, __fadd_rn), never
// contracted into FMAs, to round where torch rounds.
// Semantics: dfastllm/ops/reference.py.
#include <climits>

#include "kernels/cuda_store.cuh"
#include "kernels/layer_params.h"

namespace dfastllm {
namespace cuda {
namespace {

constexpr int kRopeThreads = 128;

template <typename T, bool kInFp32>
__device__ __forceinline__ void rotate_pair(const T* x, T* out, long long j, long long half, float c, float s) {
  const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
  if constexpr (kInFp32) {
    store(out + j, __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    store(out + j + half, __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
  } else {
    c = round_to<T>(c), s = round_to<T>(s);
    store(out + j, __fsub_rn(round_to<T>(__fmul_rn(x1, c)), round_to<T>(__fmul_rn(x2, s))));
    store(out + j + half, __fadd_rn(round_to<T>(__fmul_rn(x2, c)), round_to<T>(__fmul_rn(x1, s))));
  }
}

template <typename T, bool kInFp32>
__global__ void __launch_bounds__(kRopeThreads) rope_write_kv_kernel(const RopeWriteKvParams p) {
  const long long token = blockIdx.x;
  const long long b = token / p.tokens, t = token % p.tokens;
  const long long half = p.head_dim / 2;
  const T* q = static_cast<const T*>(p.qkv) + b * p.qkv_stride_b + t * p.qkv_stride_t;
  const T* k = q + p.n_heads * p.head_dim;
  const T* v = k + p.n_kv_heads * p.head_dim;
  const float* cos = p.cos + token * half;
  const float* sin = p.sin + token * half;
  T* q_out = static_cast<T*>(p.q_out) + b * p.q_stride_b + t * p.q_stride_t;
  const long long slot = p.slot_mapping[token];
  const bool write_kv = slot >= 0 && slot < p.num_pages * p.page_size;
  const long long at = write_kv ? (slot / p.page_size) * p.cache_stride_page + (slot % p.page_size) * p.cache_stride_slot : 0;
  T* k_slot = static_cast<T*>(p.k_cache) + at;
  T* v_slot = static_cast<T*>(p.v_cache) + at;

  const long long q_pairs = p.n_heads * half;
  const long long rope_pairs = q_pairs + (write_kv ? p.n_kv_heads * half : 0);
  for (long long i = threadIdx.x; i < rope_pairs; i += blockDim.x) {
    const bool is_q = i < q_pairs;
    const long long h = (is_q ? i : i - q_pairs) / half, j = (is_q ? i : i - q_pairs) % half;
    const T* x = is_q ? q + h * p.head_dim : k + h * p.head_dim;
    T* out = is_q ? q_out + h * p.q_stride_h : k_slot + h * p.cache_stride_head;
    rotate_pair<T, kInFp32>(x, out, j, half, cos[j], sin[j]);
  }
  if (!write_kv) return;
  for (long long i = threadIdx.x; i < p.n_kv_heads * p.head_dim; i += blockDim.x) {
    const long long h = i / p.head_dim, d = i % p.head_dim;
    v_slot[h * p.cache_stride_head + d] = v[i];
  }
}

}  // namespace
}  // namespace cuda

void rope_write_kv_cuda(const RopeWriteKvParams& p) {
  const long long n_tokens = p.batch * p.tokens;
  if (n_tokens > INT_MAX) throw std::invalid_argument("rope_write_kv: batch * tokens must be < 2^31 on CUDA");
  cuda::DeviceGuard guard(p.device);
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    const auto stream = static_cast<cudaStream_t>(p.stream);
    if (p.rotate_in_fp32) {
      cuda::rope_write_kv_kernel<T, true><<<unsigned(n_tokens), cuda::kRopeThreads, 0, stream>>>(p);
    } else {
      cuda::rope_write_kv_kernel<T, false><<<unsigned(n_tokens), cuda::kRopeThreads, 0, stream>>>(p);
    }
  });
  cuda::check(cudaGetLastError(), "rope_write_kv kernel launch");
}

}  // namespace dfastllm
