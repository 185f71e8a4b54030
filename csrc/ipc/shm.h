// POSIX shared-memory segments, cross-process futexes and the doorbell that
// every blocking wait in dfastllm's IPC is built on. No Python here: the
// binding file (ipc_module.cpp) is the only place that knows about pybind11.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace dfastllm::ipc {

// Errors the binding maps onto Python's FileNotFoundError, FileExistsError,
// ValueError and OSError, so callers get the exception they would expect.
struct NotFoundError : std::runtime_error { using std::runtime_error::runtime_error; };
struct ExistsError : std::runtime_error { using std::runtime_error::runtime_error; };
struct InvalidError : std::runtime_error { using std::runtime_error::runtime_error; };
struct SystemError : std::runtime_error { using std::runtime_error::runtime_error; };
struct TimeoutError : std::runtime_error { using std::runtime_error::runtime_error; };

// A mapping of one named segment in /dev/shm. The mapping lives as long as
// the last shared_ptr to it (rings and doorbells keep their segment alive).
class Segment {
 public:
  // Fails with ExistsError if the name is taken; the memory is reserved up
  // front (posix_fallocate), so a full /dev/shm is an error here instead of
  // a SIGBUS on first touch later.
  static std::shared_ptr<Segment> create(const std::string& name, size_t size);
  static std::shared_ptr<Segment> attach(const std::string& name);
  // Returns false if no segment has that name.
  static bool unlink(const std::string& name);

  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  uint8_t* data() const { return base_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

  // Checked access to an aligned word at a byte offset.
  std::atomic<uint64_t>* word64(size_t offset) const;
  std::atomic<uint32_t>* word32(size_t offset) const;
  void check_range(size_t offset, size_t length, size_t align) const;

 private:
  Segment(std::string name, uint8_t* base, size_t size) : name_(std::move(name)), base_(base), size_(size) {}
  std::string name_;
  uint8_t* base_;
  size_t size_;
};

// Absolute CLOCK_MONOTONIC deadline; a negative timeout means "forever".
class Deadline {
 public:
  explicit Deadline(double timeout_s);
  bool infinite() const { return infinite_; }
  bool passed() const;
  // Remaining time as a relative timespec; false if already passed.
  bool remaining(struct timespec* out) const;

 private:
  bool infinite_;
  int64_t deadline_ns_;
};

int64_t monotonic_ns();

// kWoken: a bare wake_all() arrived while the condition still does not hold
// (only reported to waiters that ask for it).
enum class WaitResult { kReady, kTimeout, kInterrupted, kWoken };

// FUTEX_WAIT / FUTEX_WAKE without FUTEX_PRIVATE_FLAG: the word is shared
// between processes through the mapping.
WaitResult futex_wait(std::atomic<uint32_t>* word, uint32_t expected, const Deadline& deadline);
int futex_wake(std::atomic<uint32_t>* word, int count);

// Two 32-bit words in shared memory: `seq` (the futex word) and `waiters`.
// Waiters announce themselves before they sleep so that a notifier only
// pays for a wake syscall when somebody is actually asleep.
struct DoorbellWords {
  std::atomic<uint32_t> seq;
  std::atomic<uint32_t> waiters;
};

// The wait protocol, Dekker style: the waiter arms (waiters += 1), issues a
// full fence, re-checks its condition and only then sleeps on `seq` with the
// value it read when arming; the notifier publishes its data, issues a full
// fence and rings if `waiters` is non-zero. One of the two always sees the
// other's store, so a wake-up is never lost.
class Doorbell {
 public:
  Doorbell(std::shared_ptr<Segment> segment, DoorbellWords* words)
      : segment_(std::move(segment)), words_(words) {}

  // Called after publishing: wakes sleepers if there are any.
  void ring() const {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (words_->waiters.load(std::memory_order_relaxed) != 0) wake_all();
  }
  // Unconditional wake (used to interrupt a waiter, e.g. on shutdown).
  void wake_all() const;
  uint32_t arm() const;
  // Saturating, so a reset() under a live sleeper cannot wrap the count.
  void disarm() const {
    uint32_t n = words_->waiters.load(std::memory_order_relaxed);
    while (n != 0 && !words_->waiters.compare_exchange_weak(n, n - 1, std::memory_order_relaxed)) {
    }
  }
  WaitResult sleep(uint32_t token, const Deadline& deadline) const {
    return futex_wait(&words_->seq, token, deadline);
  }
  // Sleep until `ready()` holds or the deadline passes; kInterrupted on a
  // signal (so the caller can let Python handle it and call again), and
  // kWoken after a wake without `ready()` if `return_on_wake`.
  template <typename Ready>
  WaitResult wait_until(Ready ready, const Deadline& deadline, bool return_on_wake = false) const {
    for (;;) {
      if (ready()) return WaitResult::kReady;
      if (deadline.passed()) return WaitResult::kTimeout;
      uint32_t token = arm();
      if (ready()) {
        disarm();
        return WaitResult::kReady;
      }
      WaitResult r = sleep(token, deadline);
      disarm();
      if (ready()) return WaitResult::kReady;
      if (r == WaitResult::kInterrupted) return r;
      if (r == WaitResult::kReady && return_on_wake) return WaitResult::kWoken;
    }
  }
  uint32_t waiters() const { return words_->waiters.load(std::memory_order_relaxed); }
  // Forgets sleepers counted by processes that died asleep. A live sleeper
  // is woken by the wake_all and counts itself again before sleeping.
  void reset() const {
    words_->waiters.store(0, std::memory_order_relaxed);
    wake_all();
  }

 private:
  std::shared_ptr<Segment> segment_;
  DoorbellWords* words_;
};

}  // namespace dfastllm::ipc
