// dfastllm._C: checks every argument the Python wrappers pass (raw pointers,
// shapes, strides, codes, the CUDA stream), fills the parameter struct and
// dispatches to the CPU or CUDA kernel. No torch types cross this boundary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "kernels/layer_params.h"
#include "kernels/params.h"
#include "kernels/philox.h"

namespace py = pybind11;
using namespace dfastllm;

namespace {

#ifdef DFASTLLM_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Messages are built with std::string and std::to_string, not iostreams: a
// toolchain that links libstdc++ statically (seen on a GPU machine, GCC 13)
// can leave the iostream locale uninitialised in a dlopen'ed module, and
// formatting a number through std::ostringstream then segfaults.
inline void append(std::string& out, const char* part) { out += part; }
inline void append(std::string& out, const std::string& part) { out += part; }
template <typename Number, typename = std::enable_if_t<std::is_arithmetic_v<Number>>>
void append(std::string& out, Number part) {
  out += std::to_string(part);
}

// Every failed check raises ValueError naming the op, the argument and what
// was expected.
template <typename... Parts>
void require(bool ok, const char* op, const char* arg, const Parts&... expected) {
  if (ok) return;
  std::string msg = std::string(op) + ": " + arg + " ";
  (append(msg, expected), ...);
  throw std::invalid_argument(msg);
}

void require_pointer(uintptr_t ptr, size_t align, bool needed, const char* op, const char* arg) {
  if (!needed) return;
  require(ptr != 0, op, arg, "must be a non-null data pointer");
  require(ptr % align == 0, op, arg, "must be aligned to ", align, " bytes, got address ", ptr);
}

enum class Device { kCpu, kCuda };

Device parse_device(const std::string& device, int device_index, const char* op) {
  if (device == "cpu") return Device::kCpu;
  require(device == "cuda", op, "device", "must be 'cpu' or 'cuda', got '", device, "'");
  require(kWithCuda, op, "device",
          "is 'cuda' but dfastllm._C was built without CUDA (nvcc not found at build time, or "
          "DFASTLLM_CPU_ONLY=1); rebuild with nvcc on PATH: pip install -e . --no-build-isolation");
  require(device_index >= 0, op, "device_index", "must be >= 0 for cuda, got ", device_index);
  return Device::kCuda;
}

size_t dtype_size(int dtype) { return dtype == int(DType::kFloat32) ? 4 : 2; }

void require_dtype(int dtype, const char* op) {
  require(dtype >= 0 && dtype <= 2, op, "dtype", "must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", dtype);
}

void sample_tokens(const std::string& device, int device_index, uintptr_t logits, int dtype,
                   int64_t n_rows, int64_t vocab, int64_t row_stride, uintptr_t temperature,
                   double temperature_scalar, uintptr_t seed, int64_t seed_scalar, uintptr_t offset,
                   int64_t offset_scalar, int confidence_mode, bool tempered_confidence,
                   uintptr_t selection_temperature, double selection_temperature_scalar, uintptr_t tokens,
                   uintptr_t confidence, int num_threads, uintptr_t stream) {
  constexpr const char* op = "sample_tokens";
  const Device dev = parse_device(device, device_index, op);
  require_dtype(dtype, op);
  require(n_rows >= 0, op, "n_rows", "must be >= 0, got ", n_rows);
  require(vocab > 0, op, "vocab", "must be > 0, got ", vocab);
  // Rows may overlap (stride 0 broadcasts one row): the kernel only reads them.
  require(row_stride >= 0, op, "row_stride", "must be >= 0, got ", row_stride);
  require(confidence_mode >= 0 && confidence_mode < kNumConfidenceModes, op, "confidence_mode",
          "must be a code of _C.confidence_modes (0 to ", kNumConfidenceModes - 1, "), got ", confidence_mode);
  require(num_threads >= 1, op, "num_threads", "must be >= 1, got ", num_threads);
  const bool any = n_rows > 0;
  require_pointer(logits, dtype_size(dtype), any, op, "logits");
  require_pointer(tokens, 8, any, op, "tokens");
  require_pointer(confidence, 4, any, op, "confidence");
  require(temperature % 4 == 0, op, "temperature", "pointer must be 4-byte aligned (or 0 for the scalar)");
  require(seed % 8 == 0, op, "seed", "pointer must be 8-byte aligned (or 0 for the scalar)");
  require(offset % 8 == 0, op, "offset", "pointer must be 8-byte aligned (or 0 for the scalar)");
  require(selection_temperature % 4 == 0, op, "selection_temperature",
          "pointer must be 4-byte aligned (or 0 for the scalar)");
  require(selection_temperature != 0 || selection_temperature_scalar >= 0.0, op, "selection_temperature_scalar",
          "must be >= 0, got ", selection_temperature_scalar);
  if (!any) return;

  SampleTokensParams p{};
  p.logits = reinterpret_cast<const void*>(logits);
  p.dtype = DType(dtype);
  p.n_rows = n_rows;
  p.vocab = vocab;
  p.row_stride = row_stride;
  p.temperature = reinterpret_cast<const float*>(temperature);
  p.temperature_scalar = float(temperature_scalar);
  p.seed = reinterpret_cast<const int64_t*>(seed);
  p.seed_scalar = seed_scalar;
  p.offset = reinterpret_cast<const int64_t*>(offset);
  p.offset_scalar = offset_scalar;
  p.confidence_mode = ConfidenceMode(confidence_mode);
  p.tempered_confidence = tempered_confidence;
  p.selection_temperature = reinterpret_cast<const float*>(selection_temperature);
  p.selection_temperature_scalar = float(selection_temperature_scalar);
  p.tokens = reinterpret_cast<int64_t*>(tokens);
  p.confidence = reinterpret_cast<float*>(confidence);
  p.num_threads = num_threads;
  p.device = device_index;
  p.stream = reinterpret_cast<void*>(stream);

  py::gil_scoped_release no_gil;
#ifdef DFASTLLM_WITH_CUDA
  if (dev == Device::kCuda) return sample_tokens_cuda(p);
#endif
  (void)dev;
  sample_tokens_cpu(p);
}

void commit_tokens(const std::string& device, int device_index, uintptr_t canvas, int64_t batch,
                   int64_t length, int64_t canvas_stride, uintptr_t cand_offsets,
                   uintptr_t cand_positions, uintptr_t tokens, uintptr_t confidence, int64_t n_cand,
                   uintptr_t k, uintptr_t threshold, int64_t mask_id, uintptr_t committed,
                   uintptr_t eligible, int num_threads, uintptr_t stream) {
  constexpr const char* op = "commit_tokens";
  const Device dev = parse_device(device, device_index, op);
  require(batch >= 0, op, "batch", "must be >= 0, got ", batch);
  require(length >= 0, op, "length", "must be >= 0, got ", length);
  require(canvas_stride >= length || batch <= 1, op, "canvas_stride", "must be >= length (", length, "), got ", canvas_stride);
  require(n_cand >= 0, op, "n_cand", "must be >= 0, got ", n_cand);
  require(num_threads >= 1, op, "num_threads", "must be >= 1, got ", num_threads);
  if (batch == 0) return;
  require_pointer(canvas, 8, length > 0, op, "canvas");
  require_pointer(cand_offsets, 4, true, op, "cand_offsets");
  require_pointer(cand_positions, 8, n_cand > 0, op, "cand_positions");
  require_pointer(tokens, 8, n_cand > 0, op, "tokens");
  require_pointer(confidence, 4, n_cand > 0, op, "confidence");
  require_pointer(k, 4, true, op, "k");
  require_pointer(threshold, 4, true, op, "threshold");
  require_pointer(committed, 4, true, op, "committed");
  require(dev == Device::kCpu || n_cand == 0 || eligible != 0, op, "eligible",
          "must be a scratch buffer of n_cand bytes on the device for cuda");

  CommitTokensParams p{};
  p.canvas = reinterpret_cast<int64_t*>(canvas);
  p.batch = batch;
  p.length = length;
  p.canvas_stride = canvas_stride;
  p.cand_offsets = reinterpret_cast<const int32_t*>(cand_offsets);
  p.cand_positions = reinterpret_cast<const int64_t*>(cand_positions);
  p.tokens = reinterpret_cast<const int64_t*>(tokens);
  p.confidence = reinterpret_cast<const float*>(confidence);
  p.n_cand = n_cand;
  p.k = reinterpret_cast<const int32_t*>(k);
  p.threshold = reinterpret_cast<const float*>(threshold);
  p.mask_id = mask_id;
  p.committed = reinterpret_cast<int32_t*>(committed);
  p.eligible = reinterpret_cast<uint8_t*>(eligible);
  p.num_threads = num_threads;
  p.device = device_index;
  p.stream = reinterpret_cast<void*>(stream);

  py::gil_scoped_release no_gil;
#ifdef DFASTLLM_WITH_CUDA
  if (dev == Device::kCuda) return commit_tokens_cuda(p);
#endif
  (void)dev;
  commit_tokens_cpu(p);
}

// ---- transformer-layer kernels (layer_params.h) ----------------------------

void add_rms_norm(const std::string& device, int device_index, uintptr_t x, int64_t x_stride,
                  uintptr_t residual, int64_t residual_stride, uintptr_t weight, uintptr_t out,
                  uintptr_t residual_out, int dtype, int64_t rows, int64_t dim, double eps, int num_threads,
                  uintptr_t stream) {
  constexpr const char* op = "add_rms_norm";
  const Device dev = parse_device(device, device_index, op);
  require_dtype(dtype, op);
  require(rows >= 0, op, "rows", "must be >= 0, got ", rows);
  require(dim > 0, op, "dim", "must be > 0, got ", dim);
  require(x_stride >= dim || rows <= 1, op, "x_stride", "must be >= dim (", dim, "), got ", x_stride);
  require(residual == 0 || residual_stride >= dim || rows <= 1, op, "residual_stride", "must be >= dim (", dim,
          "), got ", residual_stride);
  require(eps >= 0.0, op, "eps", "must be >= 0, got ", eps);
  require((residual == 0) == (residual_out == 0), op, "residual_out",
          "must be given exactly when residual is (the sum goes there)");
  require(num_threads >= 1, op, "num_threads", "must be >= 1, got ", num_threads);
  if (rows == 0) return;
  const size_t align = dtype_size(dtype);
  require_pointer(x, align, true, op, "x");
  require_pointer(residual, align, residual != 0, op, "residual");
  require_pointer(weight, align, true, op, "weight");
  require_pointer(out, align, true, op, "out");
  require_pointer(residual_out, align, residual != 0, op, "residual_out");

  AddRmsNormParams p{};
  p.x = reinterpret_cast<const void*>(x);
  p.x_stride = x_stride;
  p.residual = reinterpret_cast<const void*>(residual);
  p.residual_stride = residual_stride;
  p.weight = reinterpret_cast<const void*>(weight);
  p.out = reinterpret_cast<void*>(out);
  p.residual_out = reinterpret_cast<void*>(residual_out);
  p.dtype = DType(dtype);
  p.rows = rows;
  p.dim = dim;
  p.eps = float(eps);
  p.num_threads = num_threads;
  p.device = device_index;
  p.stream = reinterpret_cast<void*>(stream);

  py::gil_scoped_release no_gil;
#ifdef DFASTLLM_WITH_CUDA
  if (dev == Device::kCuda) return add_rms_norm_cuda(p);
#endif
  (void)dev;
  add_rms_norm_cpu(p);
}

void silu_mul(const std::string& device, int device_index, uintptr_t gate_up, int64_t gate_up_stride, uintptr_t out,
              int dtype, int64_t rows, int64_t dim, int num_threads, uintptr_t stream) {
  constexpr const char* op = "silu_mul";
  const Device dev = parse_device(device, device_index, op);
  require_dtype(dtype, op);
  require(rows >= 0, op, "rows", "must be >= 0, got ", rows);
  require(dim > 0, op, "dim", "must be > 0, got ", dim);
  require(gate_up_stride >= 2 * dim || rows <= 1, op, "gate_up_stride", "must be >= 2 * dim (", 2 * dim, "), got ",
          gate_up_stride);
  require(num_threads >= 1, op, "num_threads", "must be >= 1, got ", num_threads);
  if (rows == 0) return;
  require_pointer(gate_up, dtype_size(dtype), true, op, "gate_up");
  require_pointer(out, dtype_size(dtype), true, op, "out");

  SiluMulParams p{};
  p.gate_up = reinterpret_cast<const void*>(gate_up);
  p.gate_up_stride = gate_up_stride;
  p.out = reinterpret_cast<void*>(out);
  p.dtype = DType(dtype);
  p.rows = rows;
  p.dim = dim;
  p.num_threads = num_threads;
  p.device = device_index;
  p.stream = reinterpret_cast<void*>(stream);

  py::gil_scoped_release no_gil;
#ifdef DFASTLLM_WITH_CUDA
  if (dev == Device::kCuda) return silu_mul_cuda(p);
#endif
  (void)dev;
  silu_mul_cpu(p);
}

void rope_write_kv(const std::string& device, int device_index, uintptr_t qkv, int64_t qkv_stride_b,
                   int64_t qkv_stride_t, uintptr_t cos, uintptr_t sin, uintptr_t q_out, int64_t q_stride_b,
                   int64_t q_stride_t, int64_t q_stride_h, uintptr_t k_cache, uintptr_t v_cache,
                   int64_t cache_stride_page, int64_t cache_stride_slot, int64_t cache_stride_head,
                   int64_t num_pages, int64_t page_size, uintptr_t slot_mapping, int dtype, int64_t batch,
                   int64_t tokens, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool rotate_in_fp32,
                   int num_threads, uintptr_t stream) {
  constexpr const char* op = "rope_write_kv";
  const Device dev = parse_device(device, device_index, op);
  require_dtype(dtype, op);
  require(batch >= 0, op, "batch", "must be >= 0, got ", batch);
  require(tokens >= 0, op, "tokens", "must be >= 0, got ", tokens);
  require(n_heads > 0, op, "n_heads", "must be > 0, got ", n_heads);
  require(n_kv_heads > 0, op, "n_kv_heads", "must be > 0, got ", n_kv_heads);
  require(head_dim > 0 && head_dim % 2 == 0, op, "head_dim", "must be even and > 0, got ", head_dim);
  const int64_t width = (n_heads + 2 * n_kv_heads) * head_dim;
  require(qkv_stride_t >= width || tokens <= 1, op, "qkv_stride_t", "must be >= (n_heads + 2 * n_kv_heads) * "
          "head_dim (", width, "), got ", qkv_stride_t);
  require(qkv_stride_b >= 0, op, "qkv_stride_b", "must be >= 0, got ", qkv_stride_b);
  require(q_stride_h >= head_dim || n_heads == 1, op, "q_stride_h", "must be >= head_dim (", head_dim, "), got ",
          q_stride_h);
  require(q_stride_b >= 0 && q_stride_t >= 0, op, "q_stride_b/q_stride_t", "must be >= 0, got ", q_stride_b, " and ",
          q_stride_t);
  require(num_pages >= 0, op, "num_pages", "must be >= 0, got ", num_pages);
  require(page_size > 0, op, "page_size", "must be > 0, got ", page_size);
  require(cache_stride_head >= head_dim || n_kv_heads == 1, op, "cache_stride_head", "must be >= head_dim (",
          head_dim, "), got ", cache_stride_head);
  require(cache_stride_slot >= 0 && cache_stride_page >= 0, op, "cache strides", "must be >= 0, got ",
          cache_stride_page, " and ", cache_stride_slot);
  require(num_threads >= 1, op, "num_threads", "must be >= 1, got ", num_threads);
  if (batch == 0 || tokens == 0) return;
  const size_t align = dtype_size(dtype);
  require_pointer(qkv, align, true, op, "qkv");
  require_pointer(cos, 4, true, op, "cos");
  require_pointer(sin, 4, true, op, "sin");
  require_pointer(q_out, align, true, op, "q_out");
  require_pointer(k_cache, align, num_pages > 0, op, "k_cache");
  require_pointer(v_cache, align, num_pages > 0, op, "v_cache");
  require_pointer(slot_mapping, 8, true, op, "slot_mapping");

  RopeWriteKvParams p{};
  p.qkv = reinterpret_cast<const void*>(qkv);
  p.qkv_stride_b = qkv_stride_b;
  p.qkv_stride_t = qkv_stride_t;
  p.cos = reinterpret_cast<const float*>(cos);
  p.sin = reinterpret_cast<const float*>(sin);
  p.q_out = reinterpret_cast<void*>(q_out);
  p.q_stride_b = q_stride_b;
  p.q_stride_t = q_stride_t;
  p.q_stride_h = q_stride_h;
  p.k_cache = reinterpret_cast<void*>(k_cache);
  p.v_cache = reinterpret_cast<void*>(v_cache);
  p.cache_stride_page = cache_stride_page;
  p.cache_stride_slot = cache_stride_slot;
  p.cache_stride_head = cache_stride_head;
  p.num_pages = num_pages;
  p.page_size = page_size;
  p.slot_mapping = reinterpret_cast<const int64_t*>(slot_mapping);
  p.dtype = DType(dtype);
  p.batch = batch;
  p.tokens = tokens;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.rotate_in_fp32 = rotate_in_fp32;
  p.num_threads = num_threads;
  p.device = device_index;
  p.stream = reinterpret_cast<void*>(stream);

  py::gil_scoped_release no_gil;
#ifdef DFASTLLM_WITH_CUDA
  if (dev == Device::kCuda) return rope_write_kv_cuda(p);
#endif
  (void)dev;
  rope_write_kv_cpu(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dfastllm fused kernels; call them through dfastllm.ops, which passes checked pointers";
  m.attr("with_cuda") = kWithCuda;
  py::dict confidence_modes;
  for (int code = 0; code < kNumConfidenceModes; ++code) confidence_modes[kConfidenceModeNames[code]] = code;
  m.attr("confidence_modes") = confidence_modes;

  m.def("sample_tokens", &sample_tokens, py::kw_only(), py::arg("device"), py::arg("device_index"),
        py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"),
        py::arg("temperature"), py::arg("temperature_scalar"), py::arg("seed"), py::arg("seed_scalar"),
        py::arg("offset"), py::arg("offset_scalar"), py::arg("confidence_mode"), py::arg("tempered_confidence"),
        py::arg("selection_temperature"), py::arg("selection_temperature_scalar"), py::arg("tokens"),
        py::arg("confidence"), py::arg("num_threads"), py::arg("stream"),
        "Fills tokens/confidence for n_rows logits rows (pointers as ints, 0 = use the scalar).");

  m.def("commit_tokens", &commit_tokens, py::kw_only(), py::arg("device"), py::arg("device_index"),
        py::arg("canvas"), py::arg("batch"), py::arg("length"), py::arg("canvas_stride"),
        py::arg("cand_offsets"), py::arg("cand_positions"), py::arg("tokens"), py::arg("confidence"),
        py::arg("n_cand"), py::arg("k"), py::arg("threshold"), py::arg("mask_id"), py::arg("committed"),
        py::arg("eligible"), py::arg("num_threads"), py::arg("stream"),
        "Commits chosen candidates into canvas in place and writes per-sequence counts.");

  m.def("add_rms_norm", &add_rms_norm, py::kw_only(), py::arg("device"), py::arg("device_index"), py::arg("x"),
        py::arg("x_stride"), py::arg("residual"), py::arg("residual_stride"), py::arg("weight"), py::arg("out"),
        py::arg("residual_out"), py::arg("dtype"), py::arg("rows"), py::arg("dim"), py::arg("eps"),
        py::arg("num_threads"), py::arg("stream"),
        "out = weight * rms_norm(x + residual); residual_out = x + residual (residual 0: norm of x).");

  m.def("silu_mul", &silu_mul, py::kw_only(), py::arg("device"), py::arg("device_index"), py::arg("gate_up"),
        py::arg("gate_up_stride"), py::arg("out"), py::arg("dtype"), py::arg("rows"), py::arg("dim"),
        py::arg("num_threads"), py::arg("stream"), "out = silu(gate) * up of the fused gate|up rows.");

  m.def("rope_write_kv", &rope_write_kv, py::kw_only(), py::arg("device"), py::arg("device_index"),
        py::arg("qkv"), py::arg("qkv_stride_b"), py::arg("qkv_stride_t"), py::arg("cos"), py::arg("sin"),
        py::arg("q_out"), py::arg("q_stride_b"), py::arg("q_stride_t"), py::arg("q_stride_h"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cache_stride_page"), py::arg("cache_stride_slot"),
        py::arg("cache_stride_head"), py::arg("num_pages"), py::arg("page_size"), py::arg("slot_mapping"),
        py::arg("dtype"), py::arg("batch"), py::arg("tokens"), py::arg("n_heads"), py::arg("n_kv_heads"),
        py::arg("head_dim"), py::arg("rotate_in_fp32"), py::arg("num_threads"), py::arg("stream"),
        "RoPE on q (into q_out) and k, and k/v written into their paged-cache slots.");

  // Known-answer hooks for the tests: the same Philox the kernels use.
  m.def("philox4x32_10", [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
    const Philox4 r = philox4x32_10(Philox4{{counter[0], counter[1], counter[2], counter[3]}}, key[0], key[1]);
    return std::array<uint32_t, 4>{r.x[0], r.x[1], r.x[2], r.x[3]};
  }, py::arg("counter"), py::arg("key"));
  m.def("row_uniforms", [](int64_t seed, int64_t offset) {
    const RowUniforms u = row_uniforms(seed, offset);
    return std::make_tuple(u.sample, u.confidence);
  }, py::arg("seed"), py::arg("offset"));
}
