// rope_write_kv on the CPU: tokens split across threads; per token, every
// q head rotated into q_out, every k head rotated and every v head copied
// into the token's cache slot. Pairs (x[j], x[j + D/2]) are rotated a
// vector of j at a time.
// Semantics: dfastllm/ops/reference.py (rope_write_kv_reference).
#include <cstring>

#include "kernels/cpu_store.h"
#include "kernels/cpu_threads.h"
#include "kernels/layer_params.h"

namespace dfastllm {
namespace {

using namespace cpu;

// x rotated into out (head_dim = 2 * half). kInFp32: one rounding at the
// store; else cos/sin and every product and sum rounded to T (torch in T).
template <typename T, bool kInFp32>
inline void rotate_head(const T* x, T* out, const float* cos, const float* sin, int64_t half) {
  for (int64_t j = 0; j < half; j += kLanes) {
    const int n = lanes_at(j, half);
    const VecF x1 = load_n(x + j, n), x2 = load_n(x + half + j, n);
    VecF c = load_n(cos + j, n), s = load_n(sin + j, n);
    if constexpr (kInFp32) {
      store_n(out + j, x1 * c - x2 * s, n);
      store_n(out + half + j, x2 * c + x1 * s, n);
    } else {
      c = round_to<T>(c), s = round_to<T>(s);
      store_n(out + j, round_to<T>(x1 * c) - round_to<T>(x2 * s), n);
      store_n(out + half + j, round_to<T>(x2 * c) + round_to<T>(x1 * s), n);
    }
  }
}

template <typename T, bool kInFp32>
void rope_write_kv_tokens(const RopeWriteKvParams& p, int64_t begin, int64_t end) {
  const int64_t half = p.head_dim / 2;
  const int64_t n_slots = p.num_pages * p.page_size;
  for (int64_t token = begin; token < end; ++token) {
    const int64_t b = token / p.tokens, t = token % p.tokens;
    const T* q = static_cast<const T*>(p.qkv) + b * p.qkv_stride_b + t * p.qkv_stride_t;
    const T* k = q + p.n_heads * p.head_dim;
    const T* v = k + p.n_kv_heads * p.head_dim;
    const float* cos = p.cos + token * half;
    const float* sin = p.sin + token * half;
    T* q_out = static_cast<T*>(p.q_out) + b * p.q_stride_b + t * p.q_stride_t;
    for (int64_t h = 0; h < p.n_heads; ++h) {
      rotate_head<T, kInFp32>(q + h * p.head_dim, q_out + h * p.q_stride_h, cos, sin, half);
    }
    const int64_t slot = p.slot_mapping[token];
    if (slot < 0 || slot >= n_slots) continue;
    const int64_t at = (slot / p.page_size) * p.cache_stride_page + (slot % p.page_size) * p.cache_stride_slot;
    T* k_slot = static_cast<T*>(p.k_cache) + at;
    T* v_slot = static_cast<T*>(p.v_cache) + at;
    for (int64_t h = 0; h < p.n_kv_heads; ++h) {
      rotate_head<T, kInFp32>(k + h * p.head_dim, k_slot + h * p.cache_stride_head, cos, sin, half);
      std::memcpy(v_slot + h * p.cache_stride_head, v + h * p.head_dim, sizeof(T) * p.head_dim);
    }
  }
}

}  // namespace

void rope_write_kv_cpu(const RopeWriteKvParams& p) {
  const int64_t n_tokens = p.batch * p.tokens;
  const int threads = cpu::threads_for(n_tokens, n_tokens * (p.n_heads + 2 * p.n_kv_heads) * p.head_dim,
                                       p.num_threads);
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    cpu::parallel_ranges(n_tokens, threads, [&](int, int64_t begin, int64_t end) {
      if (p.rotate_in_fp32) {
        rope_write_kv_tokens<T, true>(p, begin, end);
      } else {
        rope_write_kv_tokens<T, false>(p, begin, end);
      }
    });
  });
}

}  // namespace dfastllm
