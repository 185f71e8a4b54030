// sample_tokens on CUDA: one block of kThreads per row.
//
// Each warp owns one contiguous segment of the row (so segments are in
// column order) and streams it with 16-byte loads (a row that is not 16-byte
// aligned is read element by element in the same steps, so it sums in the
// same order), keeping an online softmax state per thread: running max, sum
// exp(x - max) at temperature 1 and at t, first argmax, top-2, entropy sum.
// Warp shuffles and shared memory merge the states. For t > 0 a prefix sum
// over the segments' masses finds the segment holding u * total, and the whole block
// rescans only that segment (1/kWarps of the row, mostly from L2) with a
// block prefix sum. A tempered-confidence row (Dream) takes its confidence,
// and its draw, from softmax(x / t): the differences x - m that feed the
// confidence sums are multiplied by `cinv` (1 / t there, else 1), never the
// logits themselves, so the max's own term stays exactly exp(0) = 1.
// Semantics: dfastllm/ops/reference.py.
#include <cfloat>
#include <climits>
#include <cmath>

#include "kernels/cuda_common.cuh"
#include "kernels/dispatch.h"
#include "kernels/params.h"
#include "kernels/philox.h"

namespace dfastllm {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread

enum class Draw { kGreedy, kUnitTemperature, kTemperature };

// Online softmax state over some columns; sums are relative to m.
struct RowState {
  float m = kNegInf;
  float z1 = 0.0f;  // sum exp(d), d = (x - m) * cinv: the confidence's distribution
  float zt = 0.0f;  // sum exp((x - m) / t), a draw at another t only
  float s1 = 0.0f;  // sum exp(d) * d, entropy only
  float top1 = kNegInf, top2 = kNegInf;  // margin only
  long long idx = LLONG_MAX;             // first column holding m

  // Re-expresses the sums against a larger max.
  __device__ __forceinline__ void raise_max(float new_m, float inv_t, float cinv) {
    const float delta = m == kNegInf ? 0.0f : m - new_m;  // sums are 0 while m is -inf
    const float cdelta = delta * cinv;
    const float scale = ex2_approx(cdelta * kLog2e);
    s1 = scale * (s1 + cdelta * z1);
    z1 *= scale;
    zt *= ex2_approx(delta * inv_t * kLog2e);
    m = new_m;
  }

  __device__ __forceinline__ void merge(const RowState& o, float inv_t, float cinv) {
    const bool take_idx = o.m > m || (o.m == m && o.idx < idx);
    const float new_m = fmaxf(m, o.m);
    RowState a = *this, b = o;
    if (new_m != kNegInf) {
      a.raise_max(new_m, inv_t, cinv);
      b.raise_max(new_m, inv_t, cinv);
    }
    z1 = a.z1 + b.z1;
    zt = a.zt + b.zt;
    s1 = a.s1 + b.s1;
    if (take_idx) idx = o.idx;
    m = new_m;
    const float lo = fminf(top1, o.top1);
    top1 = fmaxf(top1, o.top1);
    top2 = fmaxf(lo, fmaxf(top2, o.top2));
  }

  __device__ __forceinline__ void shuffle_merge(int lane_mask, float inv_t, float cinv) {
    RowState o;
    o.m = __shfl_xor_sync(0xffffffffu, m, lane_mask);
    o.z1 = __shfl_xor_sync(0xffffffffu, z1, lane_mask);
    o.zt = __shfl_xor_sync(0xffffffffu, zt, lane_mask);
    o.s1 = __shfl_xor_sync(0xffffffffu, s1, lane_mask);
    o.top1 = __shfl_xor_sync(0xffffffffu, top1, lane_mask);
    o.top2 = __shfl_xor_sync(0xffffffffu, top2, lane_mask);
    o.idx = __shfl_xor_sync(0xffffffffu, idx, lane_mask);
    merge(o, inv_t, cinv);
  }
};

template <ConfidenceMode Mode, Draw D>
struct Needs {
  static constexpr bool kZ1 = Mode != ConfidenceMode::kRandom || D == Draw::kUnitTemperature;
  static constexpr bool kZt = D == Draw::kTemperature;
};

// Folds kN consecutive columns starting at `col` into the thread's state.
template <ConfidenceMode Mode, Draw D, int kN>
__device__ __forceinline__ void consume(const float* x, long long col, float inv_t, float cinv, RowState& st) {
  float local_max = kNegInf;
  int local_idx = 0;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    if (x[j] > local_max) local_max = x[j], local_idx = j;  // NaN never wins
  }
  if (local_max > st.m) {
    st.raise_max(local_max, inv_t, cinv);
    st.idx = col + local_idx;
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const float d = x[j] - st.m;
    if constexpr (Needs<Mode, D>::kZ1) {
      const float d1 = fmaxf(d * cinv, kExpFloor);
      const float e = ex2_approx(d1 * kLog2e);
      st.z1 += e;
      if constexpr (Mode == ConfidenceMode::kEntropy) st.s1 += e * d1;
    }
    if constexpr (Needs<Mode, D>::kZt) st.zt += exp_clamped(d * inv_t);
    if constexpr (Mode == ConfidenceMode::kMargin) {
      if (x[j] > st.top1) {
        st.top2 = st.top1;
        st.top1 = x[j];
      } else if (x[j] > st.top2) {
        st.top2 = x[j];
      }
    }
  }
}

// One warp streams columns [begin, end) of the row (begin is a multiple of kVec).
template <typename T, ConfidenceMode Mode, Draw D, bool kAligned>
__device__ void scan_segment(const T* row, long long begin, long long end, float inv_t, float cinv, RowState& st) {
  constexpr int kVec = kVecElems<T>;
  const int lane = threadIdx.x & 31;
  const long long n_vec = (end - begin) / kVec;
  for (long long v0 = 0; v0 < n_vec; v0 += 32 * kUnroll) {
    float x[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const long long v = v0 + u * 32 + lane;
      if (v < n_vec) {
        Loader<T, kVec, kAligned>::load(row + begin + v * kVec, x[u]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[u][j] = kNegInf;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      consume<Mode, D, kVec>(x[u], begin + (v0 + u * 32 + lane) * kVec, inv_t, cinv, st);
    }
  }
  for (long long c = begin + n_vec * kVec + lane; c < end; c += 32) {
    const float x = to_float(row[c]);
    consume<Mode, D, 1>(&x, c, inv_t, cinv, st);
  }
}

// Splits [0, sum of v) into one interval per thread, in thread order:
// thread i gets [start_i, start_(i+1)), where both ends come from the same
// float operations, so the intervals tile the range exactly and at most one
// thread holds any target.
struct Interval {
  float start, end;
};

// Inclusive prefix sum of v over the warp's lanes (every lane calls it).
template <typename F>
__device__ __forceinline__ F warp_inclusive_sum(F v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const F n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

__device__ Interval block_intervals(float v, float* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float inclusive = warp_inclusive_sum(v);
  const float up = __shfl_up_sync(0xffffffffu, inclusive, 1);
  const float exclusive = lane == 0 ? 0.0f : up;
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  float before = 0.0f, after = 0.0f;  // mass before this warp and before the next
  for (int w = 0; w <= warp; ++w) {
    before = after;
    after += warp_totals[w];
  }
  __syncthreads();
  const float start = lane == 0 ? before : before + exclusive;
  const float next = __shfl_down_sync(0xffffffffu, start, 1);
  return Interval{start, lane == 31 ? after : next};
}

struct DrawPlan {
  long long begin, end;  // the segment holding the target
  float residual;        // target minus the mass before the segment
};

__device__ __forceinline__ long long segment_length(long long vocab, int kVec) {
  const long long per_warp = (vocab + kWarps - 1) / kWarps;
  return (per_warp + kVec - 1) / kVec * kVec;
}

// Inverse CDF inside one segment: the first column whose running mass
// exceeds the residual; falls back to the segment's last column with mass,
// then to the row's argmax, when rounding between the sweeps leaves none.
template <typename T, Draw D, bool kAligned>
__device__ long long draw_in_segment(const T* row, const DrawPlan& plan, float row_max, float inv_t,
                                     long long argmax) {
  constexpr int kVec = kVecElems<T>;
  __shared__ float warp_totals[kWarps];
  __shared__ long long warp_last[kWarps];
  __shared__ long long claimed;

  const long long len = plan.end - plan.begin;
  const long long per_thread = ((len + kThreads - 1) / kThreads + kVec - 1) / kVec * kVec;
  const long long lo = plan.begin + min(len, per_thread * threadIdx.x);
  const long long hi = plan.begin + min(len, per_thread * (threadIdx.x + 1));
  auto mass = [&](float x) { return exp_clamped((x - row_max) * inv_t); };
  float sum = 0.0f;
  long long last_positive = -1;
  for (long long c = lo; c < hi; c += kVec) {
    float x[kVec];
    if (c + kVec <= hi) {
      Loader<T, kVec, kAligned>::load(row + c, x);
    } else {
      for (int j = 0; j < kVec; ++j) x[j] = c + j < hi ? to_float(row[c + j]) : kNegInf;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float e = mass(x[j]);
      sum += e;
      if (e > 0.0f) last_positive = c + j;
    }
  }
  if (threadIdx.x == 0) claimed = -1;
  const Interval mine = block_intervals(sum, warp_totals);  // synchronises the block
  if (mine.start <= plan.residual && plan.residual < mine.end) {
    float run = mine.start;
    long long chosen = last_positive;
    for (long long c = lo; c < hi; ++c) {
      const float e = mass(to_float(row[c]));
      if (e > 0.0f) {
        run += e;
        if (run > plan.residual) {
          chosen = c;
          break;
        }
      }
    }
    claimed = chosen;
  }
  long long last = last_positive;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
  if ((threadIdx.x & 31) == 0) warp_last[threadIdx.x >> 5] = last;
  __syncthreads();
  if (claimed >= 0) return claimed;
  // No thread holds the target: the last column with mass in the segment.
  long long best = -1;
  for (int w = 0; w < kWarps; ++w) best = max(best, warp_last[w]);
  return best >= 0 ? best : argmax;
}

// inv_t: the inverse temperature of the draw; cinv: of the confidence
// (equal under kUnitTemperature).
template <typename T, ConfidenceMode Mode, Draw D, bool kAligned>
__device__ void sample_row(const SampleTokensParams& p, long long r, float inv_t, float cinv, const RowUniforms& u) {
  __shared__ RowState warp_states[kWarps];
  __shared__ RowState row_state;
  __shared__ DrawPlan plan;

  const T* row = static_cast<const T*>(p.logits) + r * p.row_stride;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long seg = segment_length(p.vocab, kVecElems<T>);
  const long long seg_begin = min((long long)p.vocab, seg * warp);
  const long long seg_end = min((long long)p.vocab, seg_begin + seg);

  RowState st;
  scan_segment<T, Mode, D, kAligned>(row, seg_begin, seg_end, inv_t, cinv, st);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st.shuffle_merge(o, inv_t, cinv);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    RowState w = lane < kWarps ? warp_states[lane] : RowState{};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w.shuffle_merge(o, inv_t, cinv);
    if (lane == 0) row_state = w;
    if (D != Draw::kGreedy && w.m != kNegInf) {
      // The segment holding u * total: lane i takes segment i's mass (against
      // its own max, rescaled to the row's) and a warp prefix sum finds the
      // first segment whose running mass passes the target; with none (the
      // target at the very end, by rounding), the last segment with mass.
      // One exp per lane in parallel, not a serial walk of every segment.
      double mass = 0.0;
      if (lane < kWarps) {
        const RowState& s = warp_states[lane];
        const float z = D == Draw::kTemperature ? s.zt : s.z1;
        if (z > 0.0f) mass = double(z) * exp((double(s.m) - w.m) * inv_t);
      }
      const double inclusive = warp_inclusive_sum(mass);
      const double total = __shfl_sync(0xffffffffu, inclusive, 31);
      const double target = u.sample * total;
      const unsigned passes = __ballot_sync(0xffffffffu, mass > 0.0 && inclusive > target);
      const unsigned has_mass = __ballot_sync(0xffffffffu, mass > 0.0);
      const int chosen = passes ? __ffs(passes) - 1 : (has_mass ? 31 - __clz(has_mass) : 0);
      const double before = __shfl_sync(0xffffffffu, inclusive - mass, chosen);
      if (lane == 0) {
        plan.begin = min((long long)p.vocab, seg * chosen);
        plan.end = min((long long)p.vocab, plan.begin + seg);
        plan.residual = float(passes ? target - before : target - total);
      }
    }
  }
  __syncthreads();
  const RowState total = row_state;
  if (total.m == kNegInf) {  // no finite logit
    if (threadIdx.x == 0) {
      p.tokens[r] = 0;
      const float s = p.selection_temperature ? p.selection_temperature[r] : p.selection_temperature_scalar;
      p.confidence[r] = perturb_confidence(Mode == ConfidenceMode::kRandom ? u.confidence : __int_as_float(0x7fc00000),
                                           s, u.confidence);
    }
    return;
  }
  long long token = total.idx;
  if constexpr (D != Draw::kGreedy) {
    token = draw_in_segment<T, D, kAligned>(row, plan, total.m, inv_t, total.idx);
  }
  if (threadIdx.x != 0) return;
  p.tokens[r] = token;
  float conf = 0.0f;
  if constexpr (Mode == ConfidenceMode::kLowConfidence) {
    conf = float(exp((double(to_float(row[token])) - total.m) * cinv) / total.z1);
  } else if constexpr (Mode == ConfidenceMode::kRandom) {
    conf = u.confidence;
  } else if constexpr (Mode == ConfidenceMode::kMargin) {
    conf = float((1.0 - exp((double(total.top2) - total.top1) * cinv)) / total.z1);
  } else {
    conf = float(double(total.s1) / total.z1 - log(double(total.z1)));
  }
  const float s = p.selection_temperature ? p.selection_temperature[r] : p.selection_temperature_scalar;
  p.confidence[r] = perturb_confidence(conf, s, u.confidence);
}

template <typename T, ConfidenceMode Mode, bool kAligned>
__global__ void __launch_bounds__(kThreads, 2) sample_tokens_kernel(const SampleTokensParams p) {
  const long long r = blockIdx.x;
  const float t = p.temperature ? p.temperature[r] : p.temperature_scalar;
  const int64_t seed = p.seed ? p.seed[r] : p.seed_scalar;
  const int64_t offset = p.offset ? p.offset[r] : int64_t(uint64_t(p.offset_scalar) + uint64_t(r));
  const RowUniforms u = row_uniforms(seed, offset);
  const float inv_t = 1.0f / t;
  if (!(t > 0.0f) || !isfinite(inv_t)) {
    sample_row<T, Mode, Draw::kGreedy, kAligned>(p, r, 1.0f, 1.0f, u);
  } else if (t == 1.0f || p.tempered_confidence) {
    sample_row<T, Mode, Draw::kUnitTemperature, kAligned>(p, r, inv_t, inv_t, u);
  } else {
    sample_row<T, Mode, Draw::kTemperature, kAligned>(p, r, inv_t, 1.0f, u);
  }
}

}  // namespace
}  // namespace cuda

void sample_tokens_cuda(const SampleTokensParams& p) {
  if (p.n_rows > INT_MAX) throw std::invalid_argument("sample_tokens: n_rows must be < 2^31 on CUDA");
  cuda::DeviceGuard guard(p.device);
  const auto stream = static_cast<cudaStream_t>(p.stream);
  DFASTLLM_DISPATCH_DTYPE(p.dtype, T, [&] {
    DFASTLLM_DISPATCH_MODE(p.confidence_mode, Mode, [&] {
      // Both instantiations walk the row in the same kVecElems-wide steps (the
      // unaligned one loads them element by element), so a row's result does
      // not depend on its address or stride: rows reordered or copied into
      // another batch give bit-identical tokens and confidences.
      const bool aligned = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 &&
                           (p.row_stride * int64_t(sizeof(T))) % 16 == 0;
      const dim3 grid(unsigned(p.n_rows)), block(cuda::kThreads);
      if (aligned) {
        cuda::sample_tokens_kernel<T, Mode, true><<<grid, block, 0, stream>>>(p);
      } else {
        cuda::sample_tokens_kernel<T, Mode, false><<<grid, block, 0, stream>>>(p);
      }
    });
  });
  cuda::check(cudaGetLastError(), "sample_tokens kernel launch");
}

}  // namespace dfastllm
