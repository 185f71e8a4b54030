// silu_mul on CUDA: one thread per output element over a 2-D grid (rows in
// y, so no division per element). silu(x) = x / (1 + e^-x) with expf, as
// torch's CUDA silu. Semantics: dfastllm/ops/reference.py.
#include <algorithm>

#include "kernels/cuda_store.cuh"
#include "kernels/layer_params.h"

namespace dfastllm {
namespace cuda {
namespace {

constexpr int kSiluThreads = 256;

template <typename T>
__global__ void silu_mul_kernel(const SiluMulParams p) {
  for (long long r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const T* gate = static_cast<const T*>(p.gate_up) + r * p.gate_up_stride;
    T* out = static_cast<T*>(p.out) + r * p.dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.dim;
         i += (long long)gridDim.x * blockDim.x) {
      const float g = to_float(gate[i]);
      const float silu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
      store(out + i, __fmul_rn(round_to<T>(silu), to_float(gate[p.dim + i])));
    }
  }
}

}  // namespace
}  // namespace cuda

void silu_mul_cuda(const SiluMulParams& p) {
  cuda::DeviceGuard guard(p.device);
  // Rows in y (at most 65535 blocks there: more rows loop), no division per element.
  const dim3 grid(unsigned(std::min<long long>(1024, (p.dim + cuda::kSiluThreads - 1) / cuda::kSiluThreads)),
                  unsigned(std::min<long long>(65535, p.rows)));
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    cuda::silu_mul_kernel<T><<<grid, cuda::kSiluThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  });
  cuda::check(cudaGetLastError(), "silu_mul kernel launch");
}

}  // namespace dfastllm
