// Parameter structs of the transformer-layer kernels (add_rms_norm,
// rope_write_kv, silu_mul): plain pointers, sizes, strides (in elements) and
// scalars, filled by the binding after it checked every field. Beside
// params.h (the sampling kernels') so the two families of kernels can change
// apart. Semantics: dfastllm/ops/reference.py.
#pragma once

#include <cstdint>

#include "kernels/params.h"

namespace dfastllm {

// Per row: residual_out = x + residual (rounded to the dtype), then
// out = weight * dtype(fp32(residual_out) / rms) with rms = sqrt(mean(sq) + eps)
// in fp32. Without a residual the norm reads x itself.
struct AddRmsNormParams {
  const void* x;           // [rows, dim], row r at r * x_stride
  int64_t x_stride;
  const void* residual;    // [rows, dim] at r * residual_stride, or null
  int64_t residual_stride;
  const void* weight;      // [dim]
  void* out;               // [rows, dim] contiguous
  void* residual_out;      // [rows, dim] contiguous; null when residual is null
  DType dtype;             // of every tensor above
  int64_t rows;
  int64_t dim;
  float eps;
  int num_threads;
  int device;
  void* stream;
};

// Per row: out = dtype(silu(gate)) * up, gate = columns [0, dim), up = [dim, 2 dim).
struct SiluMulParams {
  const void* gate_up;     // [rows, 2 * dim], row r at r * gate_up_stride
  int64_t gate_up_stride;
  void* out;               // [rows, dim] contiguous
  DType dtype;
  int64_t rows;
  int64_t dim;
  int num_threads;
  int device;
  void* stream;
};

// Per token (b, t) of the fused q|k|v projection: rotate q into q_out and k
// into its cache slot (half-split RoPE by cos/sin), copy v into its slot.
// A slot s is (page s / page_size, offset s % page_size); a slot outside
// [0, num_pages * page_size) (padding: -1) writes no K/V.
struct RopeWriteKvParams {
  const void* qkv;         // token (b, t) at b * qkv_stride_b + t * qkv_stride_t:
  int64_t qkv_stride_b;    //   [n_heads + 2 * n_kv_heads][head_dim] contiguous
  int64_t qkv_stride_t;
  const float* cos;        // [batch, tokens, head_dim / 2] contiguous, fp32
  const float* sin;
  void* q_out;             // (b, t, h, d) at b * q_stride_b + t * q_stride_t + h * q_stride_h + d
  int64_t q_stride_b;
  int64_t q_stride_t;
  int64_t q_stride_h;
  void* k_cache;           // (page, offset, kv head, d) at page * cache_stride_page +
  void* v_cache;           //   offset * cache_stride_slot + head * cache_stride_head + d (k and v alike)
  int64_t cache_stride_page;
  int64_t cache_stride_slot;
  int64_t cache_stride_head;
  int64_t num_pages;
  int64_t page_size;
  const int64_t* slot_mapping;  // [batch, tokens] contiguous
  DType dtype;             // of qkv, q_out and the caches
  int64_t batch;
  int64_t tokens;
  int64_t n_heads;
  int64_t n_kv_heads;
  int64_t head_dim;        // even
  // true (LLaDA): rotate in fp32 and round once; false (Qwen2/Dream): round
  // cos/sin to the dtype and every product and sum, as torch does in that dtype.
  bool rotate_in_fp32;
  int num_threads;
  int device;
  void* stream;
};

void add_rms_norm_cpu(const AddRmsNormParams& p);
void silu_mul_cpu(const SiluMulParams& p);
void rope_write_kv_cpu(const RopeWriteKvParams& p);
#ifdef DFASTLLM_WITH_CUDA
void add_rms_norm_cuda(const AddRmsNormParams& p);
void silu_mul_cuda(const SiluMulParams& p);
void rope_write_kv_cuda(const RopeWriteKvParams& p);
#endif

}  // namespace dfastllm
