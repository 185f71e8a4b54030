// sample_tokens on the CPU: rows handed out to threads, one sweep per row.
//
// A row is processed in chunks of kChunk columns that stay in L1: a max
// sweep (plus first-argmax or top-2 lanes where needed), then an exp sweep
// against the running row max whose sums are rescaled when the max grows
// (online softmax). Each chunk keeps the sum of exp((x - max)/t) it saw, so
// the inverse-CDF draw for t > 0 walks the chunk sums and rescans a single
// chunk: one uniform per row instead of one Gumbel per column, and exact.
// A tempered-confidence row (Dream) takes its confidence, and its draw,
// from softmax(x / t): every difference x - max that feeds the confidence
// sums is multiplied by `cinv_` (1 / t there, else 1). Scaling differences,
// never the logits, keeps the max's own term at exactly exp(0) = 1.
// Semantics: dfastllm/ops/reference.py.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu_threads.h"
#include "kernels/cpu_vec.h"
#include "kernels/dispatch.h"
#include "kernels/params.h"
#include "kernels/philox.h"

namespace dfastllm {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // multiple of kLanes; 4-8 KiB of logits
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The exp((x - max_at) * inv_t) sum of one chunk, taken against the row max
// as it stood after that chunk.
struct ChunkSum {
  float max_at;
  float sum;
};

// Row-level accumulators of the online softmax of the confidence
// (temperature 1, or t for a tempered row).
struct RowTotals {
  float max = kNegInf;
  int64_t argmax = 0;      // greedy: first index of max
  float top1 = kNegInf;    // margin: the two largest logits (duplicates count)
  float top2 = kNegInf;
  double z1 = 0.0;         // sum exp(d), d = (x - max) * cinv
  double s1 = 0.0;         // entropy: sum exp(d) * d

  void push_top2(float v) {
    if (v > top1) {
      top2 = top1;
      top1 = v;
    } else if (v > top2) {
      top2 = v;
    }
  }
};

// How a row is sampled: greedy argmax, from the confidence's own
// distribution (t == 1, or a tempered row: sampling shares the confidence
// exps), or at another t > 0 (a second exp per column).
enum class Draw { kGreedy, kUnitTemperature, kTemperature };

template <typename T, ConfidenceMode Mode, Draw D>
class RowSampler {
  static constexpr bool kTrackArgmax = D == Draw::kGreedy;
  static constexpr bool kTrackSecond = Mode == ConfidenceMode::kMargin;
  static constexpr bool kNeedZ1 = Mode != ConfidenceMode::kRandom || D == Draw::kUnitTemperature;
  static constexpr bool kNeedZt = D == Draw::kTemperature;

 public:
  // inv_t: the inverse temperature of the draw; cinv: of the confidence
  // (equal under kUnitTemperature).
  RowSampler(const T* row, int64_t vocab, float inv_t, float cinv, ChunkSum* chunks)
      : row_(row), vocab_(vocab), inv_t_(inv_t), cinv_(cinv), chunks_(chunks) {}

  void run(const RowUniforms& u, int64_t* token, float* confidence) {
    for (int64_t start = 0, c = 0; start < vocab_; start += kChunk, ++c) {
      const int64_t len = std::min(kChunk, vocab_ - start);
      scan_max(start, len);
      chunks_[c] = accumulate_exps(start, len);
    }
    if (totals_.max == kNegInf) {  // no finite logit
      *token = 0;
      *confidence = Mode == ConfidenceMode::kRandom ? u.confidence
                                                    : std::numeric_limits<float>::quiet_NaN();
      return;
    }
    const int64_t tok = D == Draw::kGreedy ? totals_.argmax : draw(u.sample);
    *token = tok;
    *confidence = confidence_of(tok, u);
  }

 private:
  // kLanes columns from i on; those at or past end read as -inf.
  VecF load_at(int64_t i, int64_t end) const {
    return end - i >= kLanes ? load(row_ + i) : load_partial(row_ + i, int(std::max<int64_t>(0, end - i)));
  }

  // Max sweep over one chunk; merges the chunk max into the row totals and
  // rescales the running sums when it grows.
  // Per-lane running maxima over one stream of vectors.
  struct LaneMax {
    VecF m1 = splat(kNegInf), m2 = splat(kNegInf);  // largest, second largest
    VecI first{};                                    // chunk index of m1's first occurrence

    void push(VecF x, VecI index) {
      const VecI gt = x > m1;
      if constexpr (kTrackSecond) {
        const VecF lower = gt ? m1 : x;
        m2 = lower > m2 ? lower : m2;
      }
      if constexpr (kTrackArgmax) first = gt ? index : first;
      m1 = gt ? x : m1;
    }
  };

  // Max sweep over one chunk; merges the chunk max into the row totals and
  // rescales the running sums when it grows. Two interleaved streams break
  // the compare-select dependency chain (latency-bound with one).
  void scan_max(int64_t start, int64_t len) {
    LaneMax even, odd;
    VecI lane_index{};
    for (int l = 0; l < kLanes; ++l) lane_index[l] = l;
    for (int64_t i = 0; i < len; i += 2 * kLanes) {
      even.push(load_at(start + i, start + len), lane_index + int32_t(i));
      odd.push(load_at(start + i + kLanes, start + len), lane_index + int32_t(i + kLanes));
    }
    const float chunk_max = std::max(reduce_max(even.m1), reduce_max(odd.m1));
    if constexpr (kTrackSecond) {
      for (const LaneMax* s : {&even, &odd}) {
        for (int l = 0; l < kLanes; ++l) {
          totals_.push_top2(s->m1[l]);
          totals_.push_top2(s->m2[l]);
        }
      }
    }
    const float old_max = totals_.max;
    if (chunk_max > old_max) {
      if (totals_.z1 > 0.0) {
        const double shift = (double(old_max) - double(chunk_max)) * cinv_;
        const double factor = std::exp(shift);
        totals_.s1 = factor * (totals_.s1 + shift * totals_.z1);
        totals_.z1 *= factor;
      }
      if constexpr (kTrackArgmax) {
        int32_t best = int32_t(len);
        for (const LaneMax* s : {&even, &odd}) {
          for (int l = 0; l < kLanes; ++l) {
            if (s->m1[l] == chunk_max && s->first[l] < best) best = s->first[l];
          }
        }
        totals_.argmax = start + best;
      }
      totals_.max = chunk_max;
    }
  }

  ChunkSum accumulate_exps(int64_t start, int64_t len) {
    const float max = totals_.max;
    if (max == kNegInf || !(kNeedZ1 || kNeedZt)) return ChunkSum{max, 0.0f};
    const VecF vmax = splat(max), vinv_t = splat(inv_t_), vcinv = splat(cinv_);
    VecF z1[2] = {}, s1[2] = {}, zt[2] = {};  // two streams, as in scan_max
    auto add = [&](int k, VecF x) {
      const VecF d = x - vmax;
      if constexpr (kNeedZ1) {
        const VecF d1 = clamp_exp_arg(d * vcinv);
        const VecF e1 = exp_nonpositive(d1);
        z1[k] += e1;
        if constexpr (Mode == ConfidenceMode::kEntropy) s1[k] += e1 * d1;
      }
      if constexpr (kNeedZt) zt[k] += exp_nonpositive(clamp_exp_arg(d * vinv_t));
    };
    for (int64_t i = 0; i < len; i += 2 * kLanes) {
      add(0, load_at(start + i, start + len));
      add(1, load_at(start + i + kLanes, start + len));
    }
    const float z1_chunk = reduce_add(z1[0] + z1[1]);
    totals_.z1 += z1_chunk;
    if constexpr (Mode == ConfidenceMode::kEntropy) totals_.s1 += reduce_add(s1[0] + s1[1]);
    return ChunkSum{max, kNeedZt ? reduce_add(zt[0] + zt[1]) : z1_chunk};
  }

  // Inverse CDF: the first column whose running probability mass exceeds
  // u * total, never a zero-probability column.
  int64_t draw(double u) const {
    const float max = totals_.max;
    const int64_t n_chunks = (vocab_ + kChunk - 1) / kChunk;
    auto weight = [&](int64_t c) {
      const ChunkSum& s = chunks_[c];
      return s.sum > 0.0f ? double(s.sum) * std::exp((double(s.max_at) - max) * inv_t_) : 0.0;
    };
    double total = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) total += weight(c);
    const double target = u * total;
    double cum = 0.0;
    int64_t chosen = -1;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const double w = weight(c);
      if (w <= 0.0) continue;
      chosen = c;
      if (cum + w > target) break;
      cum += w;
    }
    return scan_chunk(chosen, float(target - cum));
  }

  int64_t scan_chunk(int64_t c, float residual) const {
    const int64_t start = c * kChunk, end = std::min(start + kChunk, vocab_);
    const VecF vmax = splat(totals_.max), vinv_t = splat(inv_t_);
    float run = 0.0f;
    int64_t last_positive = -1;
    for (int64_t i = start; i < end; i += kLanes) {
      const VecF d = load_at(i, end) - vmax;
      const VecF e = exp_nonpositive(clamp_exp_arg(d * vinv_t));
      const float vector_mass = reduce_add(e);
      if (vector_mass <= 0.0f) continue;
      if (run + vector_mass <= residual) {  // the common case: the target lies further on
        run += vector_mass;
        for (int l = kLanes - 1; l >= 0; --l) {
          if (e[l] > 0.0f) {
            last_positive = i + l;
            break;
          }
        }
        continue;
      }
      for (int l = 0; l < kLanes && i + l < end; ++l) {
        if (e[l] > 0.0f) {
          run += e[l];
          last_positive = i + l;
          if (run > residual) return i + l;
        }
      }
    }
    // Rounding between the two sweeps left the target just past this chunk:
    // its last column with mass, or the row max if rounding left it none.
    return last_positive >= 0 ? last_positive : first_index_of_max();
  }

  int64_t first_index_of_max() const {
    for (int64_t i = 0; i < vocab_; ++i) {
      if (to_float(row_[i]) == totals_.max) return i;
    }
    return 0;
  }

  float confidence_of(int64_t tok, const RowUniforms& u) const {
    switch (Mode) {
      case ConfidenceMode::kLowConfidence:
        return float(std::exp((double(to_float(row_[tok])) - totals_.max) * cinv_) / totals_.z1);
      case ConfidenceMode::kRandom:
        return u.confidence;
      case ConfidenceMode::kMargin:
        return float((1.0 - std::exp((double(totals_.top2) - totals_.top1) * cinv_)) / totals_.z1);
      case ConfidenceMode::kEntropy:
        return float(totals_.s1 / totals_.z1 - std::log(totals_.z1));
    }
    return 0.0f;
  }

  const T* row_;
  int64_t vocab_;
  float inv_t_;
  float cinv_;
  ChunkSum* chunks_;
  RowTotals totals_;
};

template <typename T, ConfidenceMode Mode>
void sample_rows(const SampleTokensParams& p, int64_t begin, int64_t end, ChunkSum* chunks) {
  for (int64_t r = begin; r < end; ++r) {
    const T* row = static_cast<const T*>(p.logits) + r * p.row_stride;
    const float t = p.temperature ? p.temperature[r] : p.temperature_scalar;
    const int64_t seed = p.seed ? p.seed[r] : p.seed_scalar;
    const int64_t offset = p.offset ? p.offset[r] : int64_t(uint64_t(p.offset_scalar) + uint64_t(r));
    const RowUniforms u = row_uniforms(seed, offset);
    const float inv_t = 1.0f / t;
    if (!(t > 0.0f) || !std::isfinite(inv_t)) {  // t <= 0, NaN, or too small to divide by
      RowSampler<T, Mode, Draw::kGreedy>(row, p.vocab, 1.0f, 1.0f, chunks)
          .run(u, p.tokens + r, p.confidence + r);
    } else if (t == 1.0f || p.tempered_confidence) {
      RowSampler<T, Mode, Draw::kUnitTemperature>(row, p.vocab, inv_t, inv_t, chunks)
          .run(u, p.tokens + r, p.confidence + r);
    } else {
      RowSampler<T, Mode, Draw::kTemperature>(row, p.vocab, inv_t, 1.0f, chunks)
          .run(u, p.tokens + r, p.confidence + r);
    }
    const float s = p.selection_temperature ? p.selection_temperature[r] : p.selection_temperature_scalar;
    p.confidence[r] = perturb_confidence(p.confidence[r], s, u.confidence);
  }
}

}  // namespace
}  // namespace cpu

void sample_tokens_cpu(const SampleTokensParams& p) {
  const int threads = cpu::threads_for(p.n_rows, p.n_rows * p.vocab, p.num_threads);
  const int64_t chunks_per_row = (p.vocab + cpu::kChunk - 1) / cpu::kChunk;
  std::vector<cpu::ChunkSum> chunks(size_t(threads * chunks_per_row));
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    DFASTLLM_DISPATCH_MODE(p.confidence_mode, Mode, [&] {
      cpu::parallel_ranges(p.n_rows, threads, [&](int thread, int64_t begin, int64_t end) {
        cpu::sample_rows<T, Mode>(p, begin, end, chunks.data() + thread * chunks_per_row);
      });
    });
  });
}

}  // namespace dfastllm
