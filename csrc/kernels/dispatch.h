// Compile-time dispatch of the runtime codes in params.h, in one place for the
// CPU and CUDA kernels: DFASTLLM_DISPATCH_DTYPE binds the storage type of the
// logits, DFASTLLM_DISPATCH_MODE the confidence mode.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "kernels/params.h"

namespace dfastllm {

// 16-bit storage types; each device converts them to float its own way.
struct BFloat16 {
  uint16_t bits;
};
struct Half {
  uint16_t bits;
};

}  // namespace dfastllm

#define DFASTLLM_DISPATCH_DTYPE(DTYPE, T, ...)                       \
  [&] {                                                              \
    switch (DTYPE) {                                                 \
      case ::dfastllm::DType::kFloat32: {                            \
        using T = float;                                             \
        return __VA_ARGS__();                                        \
      }                                                              \
      case ::dfastllm::DType::kFloat16: {                            \
        using T = ::dfastllm::Half;                                  \
        return __VA_ARGS__();                                        \
      }                                                              \
      case ::dfastllm::DType::kBFloat16: {                           \
        using T = ::dfastllm::BFloat16;                              \
        return __VA_ARGS__();                                        \
      }                                                              \
    }                                                                \
    throw std::invalid_argument("dfastllm: unknown dtype code");     \
  }()

#define DFASTLLM_DISPATCH_MODE(MODE, M, ...)                                          \
  [&] {                                                                               \
    switch (MODE) {                                                                   \
      case ::dfastllm::ConfidenceMode::kLowConfidence: {                              \
        constexpr auto M = ::dfastllm::ConfidenceMode::kLowConfidence;                \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case ::dfastllm::ConfidenceMode::kRandom: {                                     \
        constexpr auto M = ::dfastllm::ConfidenceMode::kRandom;                       \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case ::dfastllm::ConfidenceMode::kMargin: {                                     \
        constexpr auto M = ::dfastllm::ConfidenceMode::kMargin;                       \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case ::dfastllm::ConfidenceMode::kEntropy: {                                    \
        constexpr auto M = ::dfastllm::ConfidenceMode::kEntropy;                      \
        return __VA_ARGS__();                                                         \
      }                                                                               \
    }                                                                                 \
    throw std::invalid_argument("dfastllm: unknown confidence mode code");           \
  }()
