// Runs fn over [0, n) in small ranges handed out to short-lived std::threads
// through an atomic counter, so a thread the OS descheduled (a shared box)
// does not hold up the others; the caller's thread works too. No persistent
// pool: the kernels run synchronously inside a torch op, so torch's own pool
// is idle meanwhile and `num_threads` (torch.get_num_threads() by default) is
// honoured exactly. Results never depend on which thread took a range.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace dfastllm::cpu {

// Below this much work per thread, starting one (~20-50 us) costs more than
// it saves.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 17;

inline int threads_for(int64_t items, int64_t work, int requested) {
  const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(requested), items, by_work})));
}

// fn(thread_index, begin, end) must not throw: it runs on worker threads.
template <typename Fn>
void parallel_ranges(int64_t n, int threads, const Fn& fn) {
  if (threads <= 1) {
    fn(0, int64_t(0), n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, n / (int64_t(threads) * 8));
  std::atomic<int64_t> next{0};
  auto work = [&](int thread) {
    for (int64_t begin; (begin = next.fetch_add(grain)) < n;) fn(thread, begin, std::min(n, begin + grain));
  };
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) workers.emplace_back(work, t);
  work(0);
  for (auto& w : workers) w.join();
}

}  // namespace dfastllm::cpu
