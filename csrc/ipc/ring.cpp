#include "ring.h"

#include <cstring>
#include <new>

#include <unistd.h>

namespace dfastllm::ipc {
namespace {

constexpr size_t kMinCapacity = 4096;
constexpr size_t kMaxCapacity = size_t{1} << 31;  // frame lengths are 32-bit

bool is_power_of_two(size_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

std::shared_ptr<Ring> Ring::create(const std::string& name, size_t capacity) {
  if (!is_power_of_two(capacity) || capacity < kMinCapacity || capacity > kMaxCapacity)
    throw InvalidError("ring capacity must be a power of two in [4096, 2^31], got " + std::to_string(capacity));
  auto segment = Segment::create(name, kRingHeaderBytes + capacity);
  // The segment is fresh from ftruncate, i.e. zeroed; construct the atomics
  // in place and publish the magic last so a concurrent attach never sees a
  // half-written header.
  auto* header = new (segment->data()) RingHeader();
  header->capacity = capacity;
  header->creator_pid = static_cast<uint64_t>(::getpid());
  header->magic.store(kRingMagic, std::memory_order_release);
  return std::shared_ptr<Ring>(new Ring(std::move(segment), header));
}

std::shared_ptr<Ring> Ring::attach(const std::string& name) {
  auto segment = Segment::attach(name);
  if (segment->size() < kRingHeaderBytes + kMinCapacity)
    throw InvalidError("segment '" + segment->name() + "' is too small to be a dfastllm ring");
  auto* header = reinterpret_cast<RingHeader*>(segment->data());
  if (header->magic.load(std::memory_order_acquire) != kRingMagic)
    throw InvalidError("segment '" + segment->name() + "' is not a dfastllm ring (bad magic)");
  if (!is_power_of_two(header->capacity) || kRingHeaderBytes + header->capacity != segment->size())
    throw InvalidError("segment '" + segment->name() + "' has an inconsistent ring header");
  return std::shared_ptr<Ring>(new Ring(std::move(segment), header));
}

Ring::Ring(std::shared_ptr<Segment> segment, RingHeader* header)
    : segment_(segment),
      header_(header),
      data_(segment->data() + kRingHeaderBytes),
      capacity_(header->capacity),
      data_bell_(segment, &header->data_bell),
      space_bell_(segment, &header->space_bell),
      cached_tail_(header->tail.load(std::memory_order_acquire)),
      cached_head_(header->head.load(std::memory_order_acquire)) {}

void Ring::copy_in(uint64_t pos, const uint8_t* src, size_t len) {
  size_t offset = pos & (capacity_ - 1);
  size_t first = std::min(len, capacity_ - offset);
  std::memcpy(data_ + offset, src, first);
  std::memcpy(data_, src + first, len - first);
}

void Ring::copy_out(uint64_t pos, uint8_t* dst, size_t len) const {
  size_t offset = pos & (capacity_ - 1);
  size_t first = std::min(len, capacity_ - offset);
  std::memcpy(dst, data_ + offset, first);
  std::memcpy(dst + first, data_, len - first);
}

void Ring::check_size(size_t len) const {
  if (len > max_message_size())
    throw InvalidError("message of " + std::to_string(len) + " bytes exceeds the ring's limit of " +
                       std::to_string(max_message_size()) + " bytes");
}

bool Ring::writable(size_t len) {
  check_size(len);
  uint64_t head = header_->head.load(std::memory_order_relaxed);
  size_t need = frame_size(len);
  // used > capacity: the cache predates a reset or another producer object
  // (e.g. a restarted engine); only the shared tail can be trusted then.
  uint64_t used = head - cached_tail_;
  if (used <= capacity_ && capacity_ - used >= need) return true;
  cached_tail_ = header_->tail.load(std::memory_order_acquire);
  return capacity_ - (head - cached_tail_) >= need;
}

bool Ring::write_one(uint64_t& head, const uint8_t* data, size_t len) {
  if (!writable(len)) return false;
  uint32_t frame_header[2] = {static_cast<uint32_t>(len), ~static_cast<uint32_t>(len)};
  std::memcpy(data_ + (head & (capacity_ - 1)), frame_header, kFrameHeaderBytes);
  copy_in(head + kFrameHeaderBytes, data, len);
  head += frame_size(len);
  header_->head.store(head, std::memory_order_release);
  return true;
}

bool Ring::try_put(const uint8_t* data, size_t len) {
  uint64_t head = header_->head.load(std::memory_order_relaxed);
  if (!write_one(head, data, len)) return false;
  data_bell_.ring();
  if (extra_bell_) extra_bell_->ring();
  return true;
}

size_t Ring::try_put_many(const std::vector<std::pair<const uint8_t*, size_t>>& messages) {
  uint64_t head = header_->head.load(std::memory_order_relaxed);
  size_t written = 0;
  for (const auto& [data, len] : messages) {
    if (!write_one(head, data, len)) break;
    ++written;
  }
  if (written > 0) {
    data_bell_.ring();
    if (extra_bell_) extra_bell_->ring();
  }
  return written;
}

WaitResult Ring::wait_writable(size_t len, const Deadline& deadline) {
  check_size(len);
  // Reads tail directly instead of refreshing cached_tail_: the wait may run
  // on a helper thread (asyncio writer) while the producer thread owns the cache.
  size_t need = frame_size(len);
  auto fits = [&] {
    uint64_t head = header_->head.load(std::memory_order_relaxed);
    return capacity_ - (head - header_->tail.load(std::memory_order_acquire)) >= need;
  };
  return space_bell_.wait_until(fits, deadline);
}

std::optional<size_t> Ring::front_size() {
  uint64_t tail = header_->tail.load(std::memory_order_relaxed);
  // The cache is refreshed when it says "empty", or when it is behind tail
  // (the ring was consumed or reset through another object meanwhile).
  uint64_t available = cached_head_ - tail;
  if (available == 0 || available > capacity_) {
    cached_head_ = header_->head.load(std::memory_order_acquire);
    if (cached_head_ == tail) return std::nullopt;
  }
  uint32_t frame_header[2];
  std::memcpy(frame_header, data_ + (tail & (capacity_ - 1)), kFrameHeaderBytes);
  size_t len = frame_header[0];
  if (frame_header[1] != ~frame_header[0] || len > max_message_size() || frame_size(len) > cached_head_ - tail)
    throw InvalidError("ring '" + name() + "' is corrupted: bad frame header at offset " + std::to_string(tail));
  return len;
}

void Ring::pop_into(uint8_t* out) {
  uint64_t tail = header_->tail.load(std::memory_order_relaxed);
  uint32_t len;
  std::memcpy(&len, data_ + (tail & (capacity_ - 1)), sizeof(len));
  copy_out(tail + kFrameHeaderBytes, out, len);
  header_->tail.store(tail + frame_size(len), std::memory_order_release);
}

bool Ring::readable() const {
  return header_->head.load(std::memory_order_acquire) != header_->tail.load(std::memory_order_relaxed);
}

WaitResult Ring::wait_readable(const Deadline& deadline, bool return_on_wake) {
  return data_bell_.wait_until([&] { return readable(); }, deadline, return_on_wake);
}

size_t Ring::used_bytes() const {
  return header_->head.load(std::memory_order_acquire) - header_->tail.load(std::memory_order_acquire);
}

void Ring::reset() {
  uint64_t head = header_->head.load(std::memory_order_acquire);
  header_->tail.store(head, std::memory_order_release);
  cached_head_ = cached_tail_ = head;
  data_bell_.reset();
  space_bell_.reset();
}

}  // namespace dfastllm::ipc
