// silu_mul on the CPU: out = dtype(silu(gate)) * up per row of the fused
// gate|up projection, rows split across threads. silu(x) = x / (1 + e^-x)
// is evaluated through e = exp(-|x|) <= 1 (cpu_vec.h's exp), so no argument
// overflows: x / (1 + e) for x >= 0, x e / (1 + e) below.
// Semantics: dfastllm/ops/reference.py (silu_mul_reference).
#include "kernels/cpu_store.h"
#include "kernels/cpu_threads.h"
#include "kernels/layer_params.h"

namespace dfastllm {
namespace {

using namespace cpu;

inline VecF silu(VecF x) {
  const VecF neg_abs = x < splat(0.0f) ? x : -x;
  const VecF e = exp_nonpositive(clamp_exp_arg(neg_abs));  // NaN -> 0, and x stays NaN below
  const VecF numerator = x >= splat(0.0f) ? x : x * e;
  return numerator / (splat(1.0f) + e);
}

template <typename T>
void silu_mul_rows(const SiluMulParams& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = static_cast<const T*>(p.gate_up) + r * p.gate_up_stride;
    const T* up = gate + p.dim;
    T* out = static_cast<T*>(p.out) + r * p.dim;
    for (int64_t i = 0; i < p.dim; i += kLanes) {
      const int n = lanes_at(i, p.dim);
      store_n(out + i, round_to<T>(silu(load_n(gate + i, n))) * load_n(up + i, n), n);
    }
  }
}

}  // namespace

void silu_mul_cpu(const SiluMulParams& p) {
  const int threads = cpu::threads_for(p.rows, p.rows * p.dim, p.num_threads);
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    cpu::parallel_ranges(p.rows, threads,
                         [&](int, int64_t begin, int64_t end) { silu_mul_rows<T>(p, begin, end); });
  });
}

}  // namespace dfastllm
