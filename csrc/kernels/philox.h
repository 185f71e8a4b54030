// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a counter-based generator, so a row's draws are a pure function of
// (seed, offset) whatever thread or block computes them. Matches
// dfastllm/ops/reference.py bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DFASTLLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DFASTLLM_HOST_DEVICE inline
#endif

namespace dfastllm {

struct Philox4 {
  uint32_t x[4];
};

DFASTLLM_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = uint64_t(kM0) * ctr.x[0];
    const uint64_t p1 = uint64_t(kM1) * ctr.x[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    ctr = Philox4{{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
  }
  return ctr;
}

// The two draws of one row: key = seed, counter = (offset lo, offset hi, 0, 0).
struct RowUniforms {
  double sample;      // [0, 1), 53 bits: the inverse-CDF draw
  float confidence;   // [0, 1), 24 bits: the "random" confidence
};

DFASTLLM_HOST_DEVICE RowUniforms row_uniforms(int64_t seed, int64_t offset) {
  const uint64_t s = uint64_t(seed), o = uint64_t(offset);
  const Philox4 r = philox4x32_10(Philox4{{uint32_t(o), uint32_t(o >> 32), 0u, 0u}},
                                  uint32_t(s), uint32_t(s >> 32));
  const uint64_t bits53 = (uint64_t(r.x[0]) << 21) | (r.x[1] >> 11);
  return RowUniforms{double(bits53) * 0x1p-53, float(r.x[2] >> 8) * 0x1p-24f};
}


// Gumbel(0, 1) noise from a row's 24-bit confidence uniform, taken at the
// middle of its bin so that the argument lies strictly inside (0, 1).
DFASTLLM_HOST_DEVICE double gumbel_from_uniform(float u) { return -log(-log(double(u) + 0x1p-25)); }

// The confidence output of a row with selection temperature s > 0 (else the
// confidence itself): adding Gumbel noise to confidence / s makes "the top n"
// a draw of n without replacement from softmax(confidence / s).
DFASTLLM_HOST_DEVICE float perturb_confidence(float confidence, float s, float u) {
  return s > 0.0f ? float(double(confidence) / s + gumbel_from_uniform(u)) : confidence;
}
}  // namespace dfastllm
