// add_rms_norm on CUDA: one block per row. Each thread keeps the elements
// it owns in the first pass (sum and squares) and rereads only those in the
// second, so the residual it wrote is never read by another thread.
// Products are rounded explicitly (__fmul_rn), never contracted into FMAs,
// to round where torch rounds. Semantics: dfastllm/ops/reference.py.
#include <algorithm>
#include <climits>

#include "kernels/cuda_store.cuh"
#include "kernels/layer_params.h"

namespace dfastllm {
namespace cuda {
namespace {

template <typename T>
__global__ void add_rms_norm_kernel(const AddRmsNormParams p) {
  const long long r = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
  const T* residual = p.residual ? static_cast<const T*>(p.residual) + r * p.residual_stride : nullptr;
  T* sum = p.residual ? static_cast<T*>(p.residual_out) + r * p.dim : nullptr;
  float squares = 0.0f;
  for (long long i = threadIdx.x; i < p.dim; i += blockDim.x) {
    float v = to_float(x[i]);
    if (residual) {
      v = round_to<T>(v + to_float(residual[i]));
      store(sum + i, v);
    }
    squares = __fmaf_rn(v, v, squares);
  }
  const float inv_rms = 1.0f / sqrtf(block_sum(squares) / float(p.dim) + p.eps);
  const T* row = residual ? sum : x;
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + r * p.dim;
  for (long long i = threadIdx.x; i < p.dim; i += blockDim.x) {
    store(out + i, __fmul_rn(round_to<T>(__fmul_rn(to_float(row[i]), inv_rms)), to_float(weight[i])));
  }
}

}  // namespace
}  // namespace cuda

void add_rms_norm_cuda(const AddRmsNormParams& p) {
  if (p.rows > INT_MAX) throw std::invalid_argument("add_rms_norm: rows must be < 2^31 on CUDA");
  cuda::DeviceGuard guard(p.device);
  // One thread per 8 elements, whole warps, at most 1024.
  const unsigned threads = unsigned(std::min<long long>(1024, std::max<long long>(32, (p.dim / 8 + 31) / 32 * 32)));
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    cuda::add_rms_norm_kernel<T><<<unsigned(p.rows), threads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  });
  cuda::check(cudaGetLastError(), "add_rms_norm kernel launch");
}

}  // namespace dfastllm
