// A seqlock-protected byte blob inside a shared segment: the runtime-tunable
// configuration in the control block. Readers never block the writer and
// never return a torn value; the version is the number of writes so far.
//
// Layout at `offset` (8-aligned): [seq u64][capacity u64][length u64][data].
// seq is odd while a write is in progress. Writers serialise by moving seq
// from even to odd with a CAS. Data is copied with relaxed 8-byte atomic
// loads/stores, so the reader's racing copy is well defined; the fences
// follow Boehm, "Can seqlocks get along with programming language memory
// models?" (2012).
#pragma once

#include <string>
#include <utility>

#include "shm.h"

namespace dfastllm::ipc::seqlock {

constexpr size_t kHeaderBytes = 24;

inline size_t bytes_needed(size_t capacity) { return kHeaderBytes + ((capacity + 7) & ~size_t{7}); }

// Called once by the creator of the segment, before anyone else reads it.
void init(const Segment& segment, size_t offset, size_t capacity);

// Returns the new version. TimeoutError if another writer holds the lock
// past the deadline (it died mid-write), InvalidError if len > capacity.
uint64_t write(const Segment& segment, size_t offset, const uint8_t* data, size_t len, const Deadline& deadline);

// Returns (version, bytes). TimeoutError if no consistent copy was seen
// before the deadline.
std::pair<uint64_t, std::string> read(const Segment& segment, size_t offset, const Deadline& deadline);

}  // namespace dfastllm::ipc::seqlock
