// Single-producer single-consumer ring of variable-length messages in one
// shared-memory segment.
//
// Layout: a header page (magic, capacity, then head, tail and the two
// doorbells, each on its own cache line so the producer's and the consumer's
// writes never share one), then `capacity` bytes of data (a power of two).
// head and tail count bytes ever written / read; they never wrap, positions
// in the data are `pos & (capacity - 1)`.
//
// A frame is an 8-byte header (length, ~length as a check) followed by the
// payload padded to 8 bytes. Frames start 8-aligned, so a header never
// straddles the end of the data; a payload that does is copied in two
// pieces (split copy), which lets any message up to capacity - 8 bytes fit.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "shm.h"

namespace dfastllm::ipc {

constexpr uint64_t kRingMagic = 0x31474e52'4c4c4644ULL;  // "DFLLRNG1"
constexpr size_t kRingHeaderBytes = 4096;
constexpr size_t kFrameHeaderBytes = 8;

struct RingHeader {
  std::atomic<uint64_t> magic;  // published last by the creator
  uint64_t capacity;
  uint64_t creator_pid;
  alignas(64) std::atomic<uint64_t> head;  // written by the producer only
  alignas(64) std::atomic<uint64_t> tail;  // written by the consumer only
  alignas(64) DoorbellWords data_bell;     // the consumer sleeps here for data
  alignas(64) DoorbellWords space_bell;    // the producer sleeps here for space
};
static_assert(sizeof(RingHeader) <= kRingHeaderBytes, "ring header must fit its page");

class Ring {
 public:
  static std::shared_ptr<Ring> create(const std::string& name, size_t capacity);
  static std::shared_ptr<Ring> attach(const std::string& name);

  const std::string& name() const { return segment_->name(); }
  size_t capacity() const { return capacity_; }
  size_t max_message_size() const { return capacity_ - kFrameHeaderBytes; }
  static size_t frame_size(size_t len) { return kFrameHeaderBytes + ((len + 7) & ~size_t{7}); }

  // Producer side. Every put also rings `extra_bell` when one is set (the
  // engine's single doorbell for all request rings).
  void set_extra_bell(std::optional<Doorbell> bell) { extra_bell_ = std::move(bell); }
  bool try_put(const uint8_t* data, size_t len);
  // Writes messages in order until one does not fit; returns how many went.
  // Publishes each one but rings the doorbells once.
  size_t try_put_many(const std::vector<std::pair<const uint8_t*, size_t>>& messages);
  bool writable(size_t len);
  WaitResult wait_writable(size_t len, const Deadline& deadline);

  // Consumer side: front_size() is the next message's length (nullopt when
  // empty); pop_into() copies it out and frees its space; notify_space()
  // wakes a producer waiting for space (call once after a batch of pops).
  std::optional<size_t> front_size();
  void pop_into(uint8_t* out);
  void notify_space() { space_bell_.ring(); }
  // Wait predicates read the shared indexes directly and leave the process-
  // local caches alone, so a wait may run on a different thread than the
  // one doing the puts or gets.
  bool readable() const;
  WaitResult wait_readable(const Deadline& deadline, bool return_on_wake = false);
  // Wakes the consumer even without data (to make a waiter thread re-check
  // its stop flag).
  void wake_consumer() { data_bell_.wake_all(); }

  size_t used_bytes() const;
  // Drops unread messages (tail := head, so indexes stay monotonic and no
  // process's cached index goes stale) and clears the sleeper counts. Only
  // safe when the other side is gone: the engine calls it when it reclaims
  // a dead worker's slot.
  void reset();
  // Sleeper counts, for tests and diagnostics.
  uint32_t consumer_waiters() const { return data_bell_.waiters(); }
  uint32_t producer_waiters() const { return space_bell_.waiters(); }

 private:
  Ring(std::shared_ptr<Segment> segment, RingHeader* header);
  void check_size(size_t len) const;
  void copy_in(uint64_t pos, const uint8_t* src, size_t len);
  void copy_out(uint64_t pos, uint8_t* dst, size_t len) const;
  bool write_one(uint64_t& head, const uint8_t* data, size_t len);

  std::shared_ptr<Segment> segment_;
  RingHeader* header_;
  uint8_t* data_;
  size_t capacity_;
  Doorbell data_bell_;
  Doorbell space_bell_;
  std::optional<Doorbell> extra_bell_;
  // Process-local copies of the other side's index, refreshed only when the
  // cached value says "full" / "empty", to keep the shared cache line quiet.
  uint64_t cached_tail_ = 0;
  uint64_t cached_head_ = 0;
};

}  // namespace dfastllm::ipc
