#include "shm.h"

#include <cerrno>
#include <climits>
#include <cstring>
#include <ctime>

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace dfastllm::ipc {
namespace {

std::string errno_text(const std::string& what, const std::string& name, int err) {
  return what + " '" + name + "': " + std::strerror(err);
}

// shm_open wants "/name" with no other slash; accept "name" too.
std::string shm_path(const std::string& name) {
  std::string path = name.empty() || name[0] != '/' ? "/" + name : name;
  if (path.size() < 2 || path.size() > 255 || path.find('/', 1) != std::string::npos)
    throw InvalidError("shared-memory name must be 1-254 characters without '/', got '" + name + "'");
  return path;
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { if (fd_ >= 0) ::close(fd_); }
  int get() const { return fd_; }
 private:
  int fd_;
};

uint8_t* map(int fd, size_t size, const std::string& name) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw SystemError(errno_text("mmap", name, errno));
  return static_cast<uint8_t*>(p);
}

}  // namespace

std::shared_ptr<Segment> Segment::create(const std::string& name, size_t size) {
  std::string path = shm_path(name);
  if (size == 0) throw InvalidError("segment size must be > 0");
  Fd fd(::shm_open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600));
  if (fd.get() < 0) {
    if (errno == EEXIST) throw ExistsError("shared-memory segment '" + path + "' already exists");
    throw SystemError(errno_text("shm_open", path, errno));
  }
  int err = ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0 ? errno
                                                                  : ::posix_fallocate(fd.get(), 0, static_cast<off_t>(size));
  if (err != 0) {
    ::shm_unlink(path.c_str());
    throw SystemError(errno_text("cannot reserve " + std::to_string(size) + " bytes for", path, err));
  }
  uint8_t* base;
  try {
    base = map(fd.get(), size, path);
  } catch (...) {
    ::shm_unlink(path.c_str());
    throw;
  }
  return std::shared_ptr<Segment>(new Segment(path, base, size));
}

std::shared_ptr<Segment> Segment::attach(const std::string& name) {
  std::string path = shm_path(name);
  Fd fd(::shm_open(path.c_str(), O_RDWR, 0));
  if (fd.get() < 0) {
    if (errno == ENOENT) throw NotFoundError("no shared-memory segment named '" + path + "' (not created yet, or already unlinked)");
    throw SystemError(errno_text("shm_open", path, errno));
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw SystemError(errno_text("fstat", path, errno));
  if (st.st_size <= 0) throw InvalidError("shared-memory segment '" + path + "' is empty");
  size_t size = static_cast<size_t>(st.st_size);
  return std::shared_ptr<Segment>(new Segment(path, map(fd.get(), size, path), size));
}

bool Segment::unlink(const std::string& name) {
  std::string path = shm_path(name);
  if (::shm_unlink(path.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  throw SystemError(errno_text("shm_unlink", path, errno));
}

Segment::~Segment() { ::munmap(base_, size_); }

void Segment::check_range(size_t offset, size_t length, size_t align) const {
  if (offset % align != 0)
    throw InvalidError("offset " + std::to_string(offset) + " is not " + std::to_string(align) + "-byte aligned");
  if (offset > size_ || length > size_ - offset)
    throw InvalidError("range [" + std::to_string(offset) + ", +" + std::to_string(length) +
                       ") is outside segment '" + name_ + "' of " + std::to_string(size_) + " bytes");
}

std::atomic<uint64_t>* Segment::word64(size_t offset) const {
  check_range(offset, 8, 8);
  return reinterpret_cast<std::atomic<uint64_t>*>(base_ + offset);
}

std::atomic<uint32_t>* Segment::word32(size_t offset) const {
  check_range(offset, 4, 4);
  return reinterpret_cast<std::atomic<uint32_t>*>(base_ + offset);
}

int64_t monotonic_ns() {
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

Deadline::Deadline(double timeout_s) : infinite_(timeout_s < 0), deadline_ns_(0) {
  if (!infinite_) {
    // Cap at ~30 years so the addition cannot overflow.
    double ns = timeout_s > 1e9 ? 1e18 : timeout_s * 1e9;
    deadline_ns_ = monotonic_ns() + static_cast<int64_t>(ns);
  }
}

bool Deadline::passed() const { return !infinite_ && monotonic_ns() >= deadline_ns_; }

bool Deadline::remaining(struct timespec* out) const {
  int64_t left = deadline_ns_ - monotonic_ns();
  if (left <= 0) return false;
  out->tv_sec = left / 1000000000LL;
  out->tv_nsec = left % 1000000000LL;
  return true;
}

WaitResult futex_wait(std::atomic<uint32_t>* word, uint32_t expected, const Deadline& deadline) {
  struct timespec rel;
  struct timespec* timeout = nullptr;
  if (!deadline.infinite()) {
    if (!deadline.remaining(&rel)) return WaitResult::kTimeout;
    timeout = &rel;
  }
  long rc = ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, timeout, nullptr, 0);
  if (rc == 0 || errno == EAGAIN) return WaitResult::kReady;  // woken, or the word already moved on
  if (errno == ETIMEDOUT) return WaitResult::kTimeout;
  if (errno == EINTR) return WaitResult::kInterrupted;
  throw SystemError(std::string("futex wait: ") + std::strerror(errno));
}

int futex_wake(std::atomic<uint32_t>* word, int count) {
  long rc = ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
  if (rc < 0) throw SystemError(std::string("futex wake: ") + std::strerror(errno));
  return static_cast<int>(rc);
}

void Doorbell::wake_all() const {
  words_->seq.fetch_add(1, std::memory_order_release);
  futex_wake(&words_->seq, INT_MAX);
}

uint32_t Doorbell::arm() const {
  words_->waiters.fetch_add(1, std::memory_order_relaxed);
  uint32_t token = words_->seq.load(std::memory_order_acquire);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return token;
}

}  // namespace dfastllm::ipc
