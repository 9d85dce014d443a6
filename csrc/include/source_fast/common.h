// Shared, torch-free helpers for the source_fast compiled kernels (CPU and CUDA).
//
// Every entry point returns a `sf::Status`: kernels never throw, print or abort. The bindings layer
// (csrc/bindings/module.cpp) turns a failed Status into a Python exception. Structural checks name
// the argument, what was expected and what was given, e.g.
//   "x: expected 2 strides >= 0, got stride(0) = -4".
// Sizes and offsets are int64 everywhere (SOURCE rows x strides can exceed 2^31).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#if defined(__CUDACC__)
#define SF_HD __host__ __device__
#else
#define SF_HD
#endif

namespace sf {

using index_t = std::int64_t;

// dtype codes shared with source_fast/_extension.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    default: return "unknown";
  }
}

enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,  // shape / stride / dtype / pointer mismatch -> Python ValueError
  kUnsupported = 2,      // a valid request this build cannot run (e.g. no CUDA) -> RuntimeError
  kOverflow = 3,         // a size product does not fit int64 -> ValueError
  kCudaError = 4,        // a CUDA runtime or launch error -> RuntimeError
};

class Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status ok_status() { return Status(); }
  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
inline void append(std::ostringstream& os, const T& value, const Rest&... rest) {
  os << value;
  append(os, rest...);
}
}  // namespace detail

template <typename... Args>
inline std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  return os.str();
}

template <typename... Args>
inline Status invalid_argument(const Args&... args) {
  return Status(Code::kInvalidArgument, str_cat(args...));
}

// a * b for non-negative sizes, or false on int64 overflow.
inline bool mul_overflows(index_t a, index_t b, index_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

// Product of non-negative sizes; Status kOverflow naming `what` when it does not fit int64.
inline Status checked_numel(const char* what, std::initializer_list<index_t> sizes, index_t* out) {
  index_t total = 1;
  for (index_t s : sizes) {
    if (s < 0) return invalid_argument(what, ": expected sizes >= 0, got ", s);
    if (mul_overflows(total, s, &total))
      return Status(Code::kOverflow, str_cat(what, ": element count overflows int64"));
  }
  *out = total;
  return Status();
}

// The largest offset a strided view reaches, max over i of sum_d (size_d - 1) * stride_d, as an
// overflow check that also rejects negative strides (kernels assume non-negative strides).
inline Status check_strided(const char* name, std::initializer_list<index_t> sizes,
                            std::initializer_list<index_t> strides) {
  if (sizes.size() != strides.size())
    return invalid_argument(name, ": expected ", sizes.size(), " strides, got ", strides.size());
  index_t reach = 0;
  auto st = strides.begin();
  int dim = 0;
  for (auto sz = sizes.begin(); sz != sizes.end(); ++sz, ++st, ++dim) {
    if (*sz < 0) return invalid_argument(name, ": expected size(", dim, ") >= 0, got ", *sz);
    if (*st < 0) return invalid_argument(name, ": expected stride(", dim, ") >= 0, got ", *st);
    if (*sz == 0) return Status();  // empty view: no memory touched
    index_t term;
    if (mul_overflows(*sz - 1, *st, &term) || __builtin_add_overflow(reach, term, &reach))
      return Status(Code::kOverflow, str_cat(name, ": strided extent overflows int64"));
  }
  return Status();
}

inline Status check_ptr(const char* name, const void* p, index_t numel) {
  if (numel > 0 && p == nullptr) return invalid_argument(name, ": expected a non-null data pointer, got null");
  return Status();
}

inline Status check_dtype(const char* name, int code, std::initializer_list<int> allowed) {
  for (int a : allowed)
    if (a == code) return Status();
  std::string names;
  for (int a : allowed) names += std::string(names.empty() ? "" : ", ") + dtype_name(a);
  return invalid_argument(name, ": expected dtype in {", names, "}, got ", dtype_name(code), " (code ", code, ")");
}

SF_HD inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// Spectral function descriptor (source_fast/spectral.py `Spectral`), evaluated identically by every backend.
enum SpectralKind : int { kIdentity = 0, kInverse = 1, kExp = 2, kSourceR = 3, kDiscreteS = 4, kDiscreteR = 5 };

struct SpectralSpec {
  int kind;
  double c;
  double damping;
  double eta;
  std::int64_t steps;
};

inline Status check_spectral(const SpectralSpec& s, int index) {
  if (s.kind < kIdentity || s.kind > kDiscreteR)
    return invalid_argument("fns[", index, "].kind: expected a code in [0, 5], got ", s.kind);
  if (!(s.c >= 0) || !(s.damping >= 0) || !(s.eta >= 0) || s.c > std::numeric_limits<double>::max() ||
      s.damping > std::numeric_limits<double>::max() || s.eta > std::numeric_limits<double>::max())
    return invalid_argument("fns[", index, "]: expected finite c, damping, eta >= 0, got c=", s.c,
                            " damping=", s.damping, " eta=", s.eta);
  if (s.kind == kInverse && !(s.damping > 0))
    return invalid_argument("fns[", index, "]: inverse needs damping > 0, got ", s.damping);
  if (s.steps < 0) return invalid_argument("fns[", index, "].steps: expected >= 0, got ", s.steps);
  return Status();
}

}  // namespace sf

#define SF_RETURN_IF_ERROR(expr)          \
  do {                                    \
    ::sf::Status sf_status_ = (expr);     \
    if (!sf_status_.ok()) return sf_status_; \
  } while (0)

#define SF_CHECK_ARG(cond, ...)                                   \
  do {                                                            \
    if (!(cond)) return ::sf::invalid_argument(__VA_ARGS__);      \
  } while (0)
