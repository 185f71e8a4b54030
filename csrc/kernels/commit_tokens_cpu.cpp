// commit_tokens on the CPU: per sequence, rank the still-masked candidates
// and write the chosen tokens into the canvas. The work is a few hundred
// candidates per step, so it stays on the calling thread.
// Semantics: dfastllm/ops/reference.py.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/params.h"

namespace dfastllm {
namespace {

struct Candidate {
  float key;  // confidence, NaN as -inf
  int64_t index;
};

// Higher confidence first, then lower candidate index.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

}  // namespace

void commit_tokens_cpu(const CommitTokensParams& p) {
  std::vector<Candidate> eligible;
  for (int64_t b = 0; b < p.batch; ++b) {
    int64_t* canvas_row = p.canvas + b * p.canvas_stride;
    // Offsets are clamped into [0, n_cand] and made nondecreasing so a bad
    // offsets array can never index out of bounds.
    const int64_t lo = std::clamp<int64_t>(p.cand_offsets[b], 0, p.n_cand);
    const int64_t hi = std::clamp<int64_t>(p.cand_offsets[b + 1], lo, p.n_cand);
    eligible.clear();
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t pos = p.cand_positions[j];
      if (pos < 0 || pos >= p.length || canvas_row[pos] != p.mask_id) continue;
      const float c = p.confidence[j];
      eligible.push_back({std::isnan(c) ? -std::numeric_limits<float>::infinity() : c, j});
    }
    int64_t n_commit = 0;
    const float threshold = p.threshold[b];
    if (threshold > 0.0f) {
      // Threshold mode: everything at or above it, at least the best one.
      if (eligible.empty()) {
        p.committed[b] = 0;
        continue;
      }
      Candidate best = eligible[0];
      for (const Candidate& c : eligible) {
        if (ranks_before(c, best)) best = c;
      }
      for (const Candidate& c : eligible) {  // compacts in place, order kept
        if (c.key >= threshold) eligible[n_commit++] = c;
      }
      if (n_commit == 0) {
        eligible[0] = best;
        n_commit = 1;
      }
    } else {
      n_commit = std::clamp<int64_t>(p.k[b], 0, int64_t(eligible.size()));
      std::partial_sort(eligible.begin(), eligible.begin() + n_commit, eligible.end(), ranks_before);
    }
    for (int64_t i = 0; i < n_commit; ++i) {
      const int64_t j = eligible[i].index;
      canvas_row[p.cand_positions[j]] = p.tokens[j];
    }
    p.committed[b] = int32_t(n_commit);
  }
}

}  // namespace dfastllm
