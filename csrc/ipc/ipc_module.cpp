// pybind11 module dfastllm._ipc: shared-memory rings, doorbells, and atomic
// access to words of a shared segment (the control block lives in Python on
// top of these). Every wait releases the GIL and gives Python's signal
// handlers a turn when the futex is interrupted, so Ctrl-C works mid-wait.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <utility>
#include <vector>

#include "ring.h"
#include "seqlock.h"
#include "shm.h"

namespace py = pybind11;
using namespace dfastllm::ipc;

namespace {

// A read-only view of any contiguous bytes-like object (bytes, bytearray,
// memoryview), with a fast path for bytes.
class BytesView {
 public:
  explicit BytesView(const py::handle& obj) {
    if (PyBytes_Check(obj.ptr())) {
      data_ = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(obj.ptr()));
      size_ = static_cast<size_t>(PyBytes_GET_SIZE(obj.ptr()));
      return;
    }
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    has_view_ = true;
    data_ = static_cast<const uint8_t*>(view_.buf);
    size_ = static_cast<size_t>(view_.len);
  }
  ~BytesView() { if (has_view_) PyBuffer_Release(&view_); }
  BytesView(const BytesView&) = delete;
  BytesView(BytesView&& other) noexcept : view_(other.view_), has_view_(other.has_view_), data_(other.data_), size_(other.size_) {
    other.has_view_ = false;
  }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  Py_buffer view_{};
  bool has_view_ = false;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

Deadline make_deadline(std::optional<double> timeout) {
  if (timeout && *timeout < 0) throw py::value_error("timeout must be >= 0 or None");
  return Deadline(timeout ? *timeout : -1.0);
}

// Runs `wait(deadline)` without the GIL; on EINTR lets Python run its
// signal handlers (raising KeyboardInterrupt etc.) and then waits again.
template <typename Wait>
bool wait_without_gil(Wait wait, const Deadline& deadline) {
  for (;;) {
    WaitResult r;
    {
      py::gil_scoped_release nogil;
      r = wait(deadline);
    }
    if (r != WaitResult::kInterrupted) return r == WaitResult::kReady;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
}

py::object pop_bytes(Ring& ring) {
  std::optional<size_t> len = ring.front_size();
  if (!len) return py::none();
  PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(*len));
  if (out == nullptr) throw py::error_already_set();
  ring.pop_into(reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out)));
  return py::reinterpret_steal<py::object>(out);
}

py::object get(Ring& ring, std::optional<double> timeout) {
  Deadline deadline = make_deadline(timeout);
  for (;;) {
    py::object msg = pop_bytes(ring);
    if (!msg.is_none()) {
      ring.notify_space();
      return msg;
    }
    if (!wait_without_gil([&](const Deadline& d) { return ring.wait_readable(d); }, deadline)) return py::none();
  }
}

py::list get_many(Ring& ring, size_t max_messages) {
  py::list out;
  while (out.size() < max_messages) {
    py::object msg = pop_bytes(ring);
    if (msg.is_none()) break;
    out.append(std::move(msg));
  }
  if (!out.empty()) ring.notify_space();
  return out;
}

void put(Ring& ring, const py::handle& data, std::optional<double> timeout) {
  BytesView bytes(data);
  Deadline deadline = make_deadline(timeout);
  while (!ring.try_put(bytes.data(), bytes.size())) {
    size_t len = bytes.size();
    if (!wait_without_gil([&](const Deadline& d) { return ring.wait_writable(len, d); }, deadline))
      throw TimeoutError("ring '" + ring.name() + "' stayed full past the timeout");
  }
}

size_t try_put_many(Ring& ring, const py::sequence& messages) {
  std::vector<BytesView> views;
  views.reserve(py::len(messages));
  for (const auto& m : messages) views.emplace_back(m);
  std::vector<std::pair<const uint8_t*, size_t>> spans;
  spans.reserve(views.size());
  for (const auto& v : views) spans.emplace_back(v.data(), v.size());
  return ring.try_put_many(spans);
}

// Sleeps until one of `rings` has a message, the doorbell is rung, or the
// timeout passes; True iff some ring is readable. A bare ring() (no message)
// returns False early on purpose: the supervisor uses it to make the engine
// look at the control block now (drain, stop).
bool wait_any(const Doorbell& bell, const std::vector<std::shared_ptr<Ring>>& rings, std::optional<double> timeout) {
  auto any_readable = [&] {
    for (const auto& r : rings)
      if (r->readable()) return true;
    return false;
  };
  if (any_readable()) return true;
  Deadline deadline = make_deadline(timeout);
  wait_without_gil(
      [&](const Deadline& d) {
        uint32_t token = bell.arm();
        WaitResult r = any_readable() ? WaitResult::kReady : bell.sleep(token, d);
        bell.disarm();
        return r;
      },
      deadline);
  return any_readable();
}

void check_offset(const Segment& s, size_t offset) { s.word64(offset); }

}  // namespace

PYBIND11_MODULE(_ipc, m) {
  m.doc() = "dfastllm shared-memory IPC: SPSC rings, futex doorbells, atomic words in shared segments";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const NotFoundError& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    } catch (const ExistsError& e) {
      PyErr_SetString(PyExc_FileExistsError, e.what());
    } catch (const InvalidError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const TimeoutError& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const SystemError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  py::class_<Segment, std::shared_ptr<Segment>>(m, "Segment", "A mapped POSIX shared-memory segment.")
      .def_static("create", &Segment::create, py::arg("name"), py::arg("size"),
                  "Create and map a new zeroed segment; FileExistsError if the name is taken.")
      .def_static("attach", &Segment::attach, py::arg("name"), "Map an existing segment; FileNotFoundError if missing.")
      .def_static("unlink", &Segment::unlink, py::arg("name"), "Remove the name; False if it did not exist.")
      .def_property_readonly("name", &Segment::name)
      .def_property_readonly("size", &Segment::size)
      .def("load_u64", [](const Segment& s, size_t off) { return s.word64(off)->load(std::memory_order_acquire); })
      .def("store_u64", [](const Segment& s, size_t off, uint64_t v) { s.word64(off)->store(v, std::memory_order_release); })
      .def("cas_u64",
           [](const Segment& s, size_t off, uint64_t expected, uint64_t desired) {
             return s.word64(off)->compare_exchange_strong(expected, desired, std::memory_order_acq_rel);
           },
           py::arg("offset"), py::arg("expected"), py::arg("desired"), "Compare-and-swap; True if it swapped.")
      .def("fetch_add_u64",
           [](const Segment& s, size_t off, int64_t delta) {
             return s.word64(off)->fetch_add(static_cast<uint64_t>(delta), std::memory_order_acq_rel);
           },
           py::arg("offset"), py::arg("delta"), "Atomic add (wraps mod 2^64); returns the old value.")
      .def("futex_wait",
           [](const Segment& s, size_t off, uint32_t expected, std::optional<double> timeout) {
             auto* word = s.word32(off);
             return wait_without_gil([&](const Deadline& d) { return futex_wait(word, expected, d); }, make_deadline(timeout));
           },
           py::arg("offset"), py::arg("expected"), py::arg("timeout") = py::none(),
           "Sleep while the 32-bit word at offset equals expected; False on timeout.")
      .def("futex_wake", [](const Segment& s, size_t off, int count) { return futex_wake(s.word32(off), count); },
           py::arg("offset"), py::arg("count") = INT32_MAX)
      .def("doorbell",
           [](const std::shared_ptr<Segment>& s, size_t off) {
             check_offset(*s, off);
             return Doorbell(s, reinterpret_cast<DoorbellWords*>(s->data() + off));
           },
           py::arg("offset"), "The doorbell (two 32-bit words) at an 8-aligned offset.")
      .def("seqlock_init", [](const Segment& s, size_t off, size_t capacity) { seqlock::init(s, off, capacity); })
      .def("seqlock_write",
           [](const Segment& s, size_t off, const py::handle& data, double timeout) {
             BytesView bytes(data);
             Deadline deadline = make_deadline(timeout);
             py::gil_scoped_release nogil;
             return seqlock::write(s, off, bytes.data(), bytes.size(), deadline);
           },
           py::arg("offset"), py::arg("data"), py::arg("timeout") = 1.0, "Write the blob; returns its new version.")
      .def("seqlock_read",
           [](const Segment& s, size_t off, double timeout) {
             std::pair<uint64_t, std::string> got;
             {
               Deadline deadline = make_deadline(timeout);
               py::gil_scoped_release nogil;
               got = seqlock::read(s, off, deadline);
             }
             return std::make_pair(got.first, py::bytes(got.second));
           },
           py::arg("offset"), py::arg("timeout") = 1.0, "Returns (version, bytes), never torn.");
  m.attr("SEQLOCK_HEADER_BYTES") = seqlock::kHeaderBytes;

  py::class_<Doorbell>(m, "Doorbell", "A futex word plus a sleeper count: wakes cost a syscall only when someone sleeps.")
      .def("ring", &Doorbell::ring, "Wake sleepers, if any (cheap when nobody sleeps).")
      .def("reset", &Doorbell::reset,
           "Forget sleepers left counted by a process that died mid-wait, and wake any real one.")
      .def("wait_any", &wait_any, py::arg("rings"), py::arg("timeout") = py::none(),
           "Sleep until a ring has a message, the bell rings or the timeout passes; True iff a ring is readable.")
      .def_property_readonly("waiters", &Doorbell::waiters);

  py::class_<Ring, std::shared_ptr<Ring>>(m, "Ring", "Single-producer single-consumer ring of byte messages in shared memory.")
      .def_static("create", &Ring::create, py::arg("name"), py::arg("capacity"),
                  "Create a ring; capacity is a power of two in [4096, 2^31].")
      .def_static("attach", &Ring::attach, py::arg("name"))
      .def_static("unlink", &Segment::unlink, py::arg("name"), "Remove the name; False if it did not exist.")
      .def_property_readonly("name", &Ring::name)
      .def_property_readonly("capacity", &Ring::capacity)
      .def_property_readonly("max_message_size", &Ring::max_message_size)
      .def_property_readonly("used_bytes", &Ring::used_bytes)
      .def_property_readonly("consumer_waiters", &Ring::consumer_waiters)
      .def_property_readonly("producer_waiters", &Ring::producer_waiters)
      .def("set_doorbell", &Ring::set_extra_bell, py::arg("doorbell"),
           "Also ring this doorbell on every put (None to stop).")
      .def("try_put", [](Ring& r, const py::handle& data) { BytesView b(data); return r.try_put(b.data(), b.size()); },
           py::arg("data"), "Append one message; False if the ring is full (backpressure). ValueError if it can never fit.")
      .def("try_put_many", &try_put_many, py::arg("messages"),
           "Append messages in order until one does not fit; returns how many were written.")
      .def("put", &put, py::arg("data"), py::arg("timeout") = py::none(),
           "Append one message, waiting for space; TimeoutError if none came in time.")
      .def("get_nowait", [](Ring& r) {
             py::object msg = pop_bytes(r);
             if (!msg.is_none()) r.notify_space();
             return msg;
           }, "The next message, or None if the ring is empty.")
      .def("get", &get, py::arg("timeout") = py::none(), "The next message, waiting for one; None on timeout.")
      .def("get_many", &get_many, py::arg("max_messages") = 1024, "Up to max_messages messages, without waiting.")
      .def("wait_readable",
           [](Ring& r, std::optional<double> timeout) {
             return wait_without_gil([&](const Deadline& d) { return r.wait_readable(d, true); }, make_deadline(timeout));
           },
           py::arg("timeout") = py::none(), "Sleep until a message is there; False on timeout or wake_consumer().")
      .def("wait_writable",
           [](Ring& r, size_t nbytes, std::optional<double> timeout) {
             return wait_without_gil([&](const Deadline& d) { return r.wait_writable(nbytes, d); }, make_deadline(timeout));
           },
           py::arg("nbytes"), py::arg("timeout") = py::none(), "Sleep until a message of nbytes fits; False on timeout.")
      .def("wake_consumer", &Ring::wake_consumer, "Wake a waiting consumer even without a message.")
      .def("reset", &Ring::reset, "Drop unread messages and sleeper counts; only when the other side is gone.");
}
