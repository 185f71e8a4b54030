// The one interface between host code (bindings) and the kernels: plain
// structs of pointers, sizes and scalars. Nothing here knows about Python or
// torch; the binding fills these after checking every field.
#pragma once

#include <cstdint>

namespace dfastllm {

// Codes shared with dfastllm/ops/_extension.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The confidence table of C++: codes here, names by code below. The extension
// exports it (`_C.confidence_modes`) and dfastllm/ops/_extension.py refuses to
// import when it differs from dfastllm.sampling_params.Remasking, the table of
// Python.
enum class ConfidenceMode : int { kLowConfidence = 0, kRandom = 1, kMargin = 2, kEntropy = 3 };
inline constexpr const char* kConfidenceModeNames[] = {"low_confidence", "random", "margin", "entropy"};
inline constexpr int kNumConfidenceModes = int(sizeof(kConfidenceModeNames) / sizeof(kConfidenceModeNames[0]));

struct SampleTokensParams {
  const void* logits;  // [n_rows, vocab], element (r, c) at r * row_stride + c
  DType dtype;
  int64_t n_rows;
  int64_t vocab;
  int64_t row_stride;  // in elements, >= 0 (rows may overlap: they are only read)

  // Per-row values come from the array when it is non-null, else from the
  // scalar (offset: offset_scalar + row).
  const float* temperature;
  float temperature_scalar;
  const int64_t* seed;
  int64_t seed_scalar;
  const int64_t* offset;
  int64_t offset_scalar;

  ConfidenceMode confidence_mode;
  // false (LLaDA): the confidence comes from softmax(logits), whatever the
  // temperature. true (Dream): the row is divided by its temperature first
  // (when t > 0), and the token and its confidence both come from
  // softmax(logits / t).
  bool tempered_confidence;
  // Per row, like temperature (Dream's alg_temp): when > 0 the confidence
  // output is confidence / s + Gumbel noise drawn from the row's u_conf, so
  // that the top n of the outputs are a draw without replacement from
  // softmax(confidence / s).
  const float* selection_temperature;
  float selection_temperature_scalar;
  int64_t* tokens;    // [n_rows] out
  float* confidence;  // [n_rows] out

  int num_threads;     // CPU: worker threads to use (>= 1)
  int device;          // CUDA: device ordinal of every pointer
  void* stream;        // CUDA: cudaStream_t
};

struct CommitTokensParams {
  int64_t* canvas;  // [batch, length], element (b, l) at b * canvas_stride + l
  int64_t batch;
  int64_t length;
  int64_t canvas_stride;
  const int32_t* cand_offsets;    // [batch + 1], nondecreasing, last = n_cand
  const int64_t* cand_positions;  // [n_cand]
  const int64_t* tokens;          // [n_cand]
  const float* confidence;        // [n_cand]
  int64_t n_cand;
  const int32_t* k;               // [batch]
  const float* threshold;         // [batch]
  int64_t mask_id;
  int32_t* committed;             // [batch] out
  uint8_t* eligible;              // CUDA: [n_cand] scratch for the masked-before-commit snapshot
  int num_threads;
  int device;
  void* stream;
};

void sample_tokens_cpu(const SampleTokensParams& p);
void commit_tokens_cpu(const CommitTokensParams& p);
#ifdef DFASTLLM_WITH_CUDA
void sample_tokens_cuda(const SampleTokensParams& p);
void commit_tokens_cuda(const CommitTokensParams& p);
#endif

}  // namespace dfastllm
