// What fastce uses of torch: the LibTorch stable ABI (torch/csrc/stable, torch 2.11's
// subset: -DTORCH_TARGET_VERSION), so that one built library works with every later torch.
//
// Errors: across the stable ABI an exception reaches Python as RuntimeError with its
// message. A message that starts with a tag "[fastce:ValueError] " is re-raised by the Python
// side (fastce/_errors.py) as that type without the tag, so users see torch's exception
// types and messages.
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "rules.h"

namespace fastce {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

// ---- errors -------------------------------------------------------------------------------
enum class Error { Runtime, Value, Index, Type, NotImplemented };

inline const char* error_tag(Error e) {
  switch (e) {
    case Error::Value: return "[fastce:ValueError] ";
    case Error::Index: return "[fastce:IndexError] ";
    case Error::Type: return "[fastce:TypeError] ";
    case Error::NotImplemented: return "[fastce:NotImplementedError] ";
    default: return "";
  }
}

// Shapes print as torch prints them: [2, 3].
inline std::ostream& operator<<(std::ostream& out, IntArrayRef shape) {
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  return out << ']';
}
inline std::ostream& operator<<(std::ostream& out, const std::vector<int64_t>& shape) {
  return out << IntArrayRef(shape);
}

template <class... A>
[[noreturn]] void fail(Error e, const A&... parts) {
  std::ostringstream msg;
  msg << error_tag(e);
  (msg << ... << parts);
  throw std::runtime_error(msg.str());
}

#define FASTCE_CHECK_AS(kind, cond, ...) \
  do {                                   \
    if (!(cond)) ::fastce::fail(::fastce::Error::kind, __VA_ARGS__); \
  } while (0)
#define FASTCE_CHECK(cond, ...) FASTCE_CHECK_AS(Runtime, cond, __VA_ARGS__)
#define FASTCE_CHECK_VALUE(cond, ...) FASTCE_CHECK_AS(Value, cond, __VA_ARGS__)
#define FASTCE_CHECK_INDEX(cond, ...) FASTCE_CHECK_AS(Index, cond, __VA_ARGS__)
#define FASTCE_CHECK_TYPE(cond, ...) FASTCE_CHECK_AS(Type, cond, __VA_ARGS__)
#define FASTCE_CHECK_NOT_IMPLEMENTED(cond, ...) FASTCE_CHECK_AS(NotImplemented, cond, __VA_ARGS__)

// ---- dtypes and devices -----------------------------------------------------------------------
inline Dtype kernel_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Double: return Dtype::Float64;
    case ScalarType::BFloat16: return Dtype::BFloat16;
    case ScalarType::Half: return Dtype::Float16;
    default: return Dtype::Float32;
  }
}
inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 ||
         t == ScalarType::Half;
}
// Bytes per element of the floating types the ops take.
inline size_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    case ScalarType::Byte:
    case ScalarType::Char:
    case ScalarType::Bool: return 1;
    default: FASTCE_CHECK_VALUE(false, "fastce: unsupported dtype ", int(t));
  }
  return 0;
}
// float, or double for double inputs.
inline ScalarType accumulation_type(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// torch's names: cpu, cuda:0, meta.
inline std::string device_name(const Tensor& t) {
  const auto d = t.device();
  std::string name = d.type() == DeviceType::CPU    ? "cpu"
                     : d.type() == DeviceType::CUDA ? "cuda"
                     : d.type() == DeviceType::Meta ? "meta"
                                                    : "device";
  if (d.has_index() && d.type() != DeviceType::CPU) name += ":" + std::to_string(int(d.index()));
  return name;
}

// ---- tensors --------------------------------------------------------------------------------
inline std::vector<int64_t> shape_of(const Tensor& t) {
  const IntArrayRef s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end());
}

// An uninitialized contiguous tensor on the host.
Tensor host_empty(IntArrayRef shape, ScalarType dtype);

// An uninitialized contiguous tensor on `like`'s device.
Tensor empty_on(const Tensor& like, IntArrayRef shape, ScalarType dtype);

// A 0-d or 1-d tensor's values as doubles (copied to the host first when needed).
std::vector<double> to_doubles(const Tensor& t, int64_t count, const char* what);

// Per-row values (computed in double) as a new tensor of `dtype` and `shape` on `like`'s
// device.
Tensor from_doubles(const std::vector<double>& values, IntArrayRef shape, ScalarType dtype, const Tensor& like);

// ---- boxed kernels --------------------------------------------------------------------------
// Reads a boxed call's arguments in schema order (the ops' kernels are boxed by hand so
// that the options are read in one place, read_options).
class Args {
 public:
  explicit Args(StableIValue* stack) : stack_(stack) {}
  Tensor tensor() { return get<Tensor>(); }
  std::optional<Tensor> optional_tensor() { return get<std::optional<Tensor>>(); }
  int64_t integer() { return get<int64_t>(); }
  double real() { return get<double>(); }
  bool flag() { return get<bool>(); }
  std::optional<double> optional_real() { return get<std::optional<double>>(); }
  std::optional<ScalarType> optional_dtype() { return get<std::optional<ScalarType>>(); }

 private:
  template <class T>
  T get() {
    return torch::stable::detail::to<T>(stack_[i_++]);
  }
  StableIValue* stack_;
  int i_ = 0;
};

// Writes a boxed call's results.
template <class... T>
void put_results(StableIValue* stack, T&&... results) {
  int i = 0;
  ((stack[i++] = torch::stable::detail::from(std::forward<T>(results))), ...);
}

}  // namespace fastce
