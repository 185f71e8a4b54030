// add_rms_norm on the CPU: rows split across threads, each row in three
// vector passes (add and store the residual, sum of squares, scale and
// weight), reading the row the norm sees after it was rounded to the dtype.
// Semantics: dfastllm/ops/reference.py (add_rms_norm_reference).
#include <cmath>

#include "kernels/cpu_store.h"
#include "kernels/cpu_threads.h"
#include "kernels/layer_params.h"

namespace dfastllm {
namespace {

using namespace cpu;

template <typename T>
void add_rms_norm_rows(const AddRmsNormParams& p, int64_t begin, int64_t end) {
  const T* weight = static_cast<const T*>(p.weight);
  for (int64_t r = begin; r < end; ++r) {
    const T* row = static_cast<const T*>(p.x) + r * p.x_stride;
    if (p.residual != nullptr) {
      const T* residual = static_cast<const T*>(p.residual) + r * p.residual_stride;
      T* sum = static_cast<T*>(p.residual_out) + r * p.dim;
      for (int64_t i = 0; i < p.dim; i += kLanes) {
        const int n = lanes_at(i, p.dim);
        store_n(sum + i, load_n(row + i, n) + load_n(residual + i, n), n);
      }
      row = sum;  // the norm reads the rounded sum, as torch does
    }
    VecF squares{};
    for (int64_t i = 0; i < p.dim; i += kLanes) {
      const VecF v = load_n(row + i, lanes_at(i, p.dim));
      squares += v * v;
    }
    const float inv_rms = 1.0f / std::sqrt(reduce_add(squares) / float(p.dim) + p.eps);
    T* out = static_cast<T*>(p.out) + r * p.dim;
    for (int64_t i = 0; i < p.dim; i += kLanes) {
      const int n = lanes_at(i, p.dim);
      store_n(out + i, round_to<T>(load_n(row + i, n) * inv_rms) * load_n(weight + i, n), n);
    }
  }
}

}  // namespace

void add_rms_norm_cpu(const AddRmsNormParams& p) {
  const int threads = cpu::threads_for(p.rows, p.rows * p.dim, p.num_threads);
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    cpu::parallel_ranges(p.rows, threads,
                         [&](int, int64_t begin, int64_t end) { add_rms_norm_rows<T>(p, begin, end); });
  });
}

}  // namespace dfastllm
