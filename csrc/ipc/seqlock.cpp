#include "seqlock.h"

#include <cstring>

#include <sched.h>

namespace dfastllm::ipc::seqlock {
namespace {

struct View {
  std::atomic<uint64_t>* seq;
  std::atomic<uint64_t>* capacity;
  std::atomic<uint64_t>* length;
  uint64_t* data;
};

View view(const Segment& segment, size_t offset) {
  segment.check_range(offset, kHeaderBytes, 8);
  View v{segment.word64(offset), segment.word64(offset + 8), segment.word64(offset + 16),
         reinterpret_cast<uint64_t*>(segment.data() + offset + kHeaderBytes)};
  segment.check_range(offset, bytes_needed(v.capacity->load(std::memory_order_relaxed)), 8);
  return v;
}

}  // namespace

void init(const Segment& segment, size_t offset, size_t capacity) {
  segment.check_range(offset, bytes_needed(capacity), 8);
  segment.word64(offset)->store(0, std::memory_order_relaxed);
  segment.word64(offset + 16)->store(0, std::memory_order_relaxed);
  segment.word64(offset + 8)->store(capacity, std::memory_order_release);
}

uint64_t write(const Segment& segment, size_t offset, const uint8_t* data, size_t len, const Deadline& deadline) {
  View v = view(segment, offset);
  uint64_t capacity = v.capacity->load(std::memory_order_relaxed);
  if (len > capacity)
    throw InvalidError("blob of " + std::to_string(len) + " bytes exceeds the capacity of " + std::to_string(capacity));
  uint64_t seq = v.seq->load(std::memory_order_relaxed);
  while ((seq & 1) != 0 || !v.seq->compare_exchange_weak(seq, seq + 1, std::memory_order_relaxed)) {
    if (deadline.passed()) throw TimeoutError("another writer has held the seqlock past the deadline (did it die?)");
    sched_yield();
    seq = v.seq->load(std::memory_order_relaxed);
  }
  std::atomic_thread_fence(std::memory_order_release);
  v.length->store(len, std::memory_order_relaxed);
  for (size_t i = 0; i * 8 < len; ++i) {
    uint64_t word = 0;
    std::memcpy(&word, data + i * 8, std::min<size_t>(8, len - i * 8));
    __atomic_store_n(&v.data[i], word, __ATOMIC_RELAXED);
  }
  v.seq->store(seq + 2, std::memory_order_release);
  return (seq + 2) / 2;
}

std::pair<uint64_t, std::string> read(const Segment& segment, size_t offset, const Deadline& deadline) {
  View v = view(segment, offset);
  uint64_t capacity = v.capacity->load(std::memory_order_relaxed);
  std::string out;
  for (;;) {
    uint64_t before = v.seq->load(std::memory_order_acquire);
    if ((before & 1) == 0) {
      // A torn length is caught by the seq re-check below; clamp it so the
      // copy stays inside the blob meanwhile.
      size_t len = std::min<uint64_t>(v.length->load(std::memory_order_relaxed), capacity);
      out.resize(len);
      for (size_t i = 0; i * 8 < len; ++i) {
        uint64_t word = __atomic_load_n(&v.data[i], __ATOMIC_RELAXED);
        std::memcpy(out.data() + i * 8, &word, std::min<size_t>(8, len - i * 8));
      }
      std::atomic_thread_fence(std::memory_order_acquire);
      if (v.seq->load(std::memory_order_relaxed) == before) return {before / 2, std::move(out)};
    }
    if (deadline.passed()) throw TimeoutError("no consistent read of the seqlock blob before the deadline (writer died mid-write?)");
    sched_yield();
  }
}

}  // namespace dfastllm::ipc::seqlock
