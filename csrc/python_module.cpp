// The fastce._C module. Importing it loads this library, which registers the ops (ops.cpp
// and the kernels). Its functions:
// - forward_below_autograd, backward_below_autograd, backward_inplace_below_autograd: the
//   eager fast path's doors into the ops. They call fastce::cross_entropy_forward /
//   _backward / _backward_inplace through the dispatcher (the CPU or CUDA kernel runs, as
//   with torch.ops) below the Autograd key, without torch.ops's generic boxing: on a 64x10
//   batch, passing 11 to 14 arguments and the results through IValues costs more than the
//   kernel. The caller (_ops.py) has normalized the argument types; the op validates the
//   values, and its errors reach Python as the exceptions torch.ops raises (HANDLE_TH_ERRORS).
// - empty_cache: unmaps the CPU gradient buffer kept for reuse (cpu/grad_buffer.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <optional>
#include <tuple>

#include "cpu/grad_buffer.h"

namespace fastce {
namespace {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, double,
    double, std::optional<double>, double, bool, bool, double);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
    double, std::optional<double>, double, bool);

using BackwardInplaceSignature = void(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
    double, std::optional<double>, double);

// Reads a call's positional arguments in order, as the op's schema types.
class Args {
 public:
  Args(const char* fn, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t expected) : fn_(fn), args_(args) {
    TORCH_CHECK_TYPE(nargs == expected, fn, " takes ", expected, " arguments, got ", nargs);
  }
  const at::Tensor& tensor() {
    PyObject* obj = next();
    TORCH_CHECK_TYPE(THPVariable_Check(obj), fn_, ": argument ", i_ - 1, " must be a Tensor");
    return THPVariable_Unpack(obj);
  }
  std::optional<at::Tensor> optional_tensor() {
    if (args_[i_] == Py_None) return (++i_, std::nullopt);
    return tensor();
  }
  int64_t integer() { return checked(PyLong_AsLongLong(next())); }
  double real() { return checked(PyFloat_AsDouble(next())); }
  std::optional<double> optional_real() {
    if (args_[i_] == Py_None) return (++i_, std::nullopt);
    return real();
  }
  bool flag() { return checked(PyObject_IsTrue(next())) != 0; }

 private:
  PyObject* next() { return args_[i_++]; }
  template <class V>
  static V checked(V v) {  // -1 is how the C API reports an error
    if (v == V(-1) && PyErr_Occurred()) throw python_error();
    return v;
  }
  const char* fn_;
  PyObject* const* args_;
  int i_ = 0;
};

// The op's results as a Python tuple of tensors.
template <class... T>
PyObject* wrap_all(std::tuple<T...> results) {
  std::array<at::Tensor, sizeof...(T)> tensors =
      std::apply([](auto&... t) { return std::array<at::Tensor, sizeof...(T)>{std::move(t)...}; }, results);
  PyObject* tuple = PyTuple_New(tensors.size());
  if (!tuple) throw python_error();
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* item = THPVariable_Wrap(std::move(tensors[i]));
    if (!item) {
      Py_DECREF(tuple);  // frees the items set so far
      throw python_error();
    }
    PyTuple_SET_ITEM(tuple, i, item);  // steals the reference
  }
  return tuple;
}

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Runs the op below the Autograd key, without the GIL (as torch.ops does).
template <class Op, class... A>
auto call_below_autograd(const Op& op, const A&... args) {
  pybind11::gil_scoped_release no_gil;
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(args...);
}

// forward_below_autograd(input, target, weight, reduction, ignore_index, label_smoothing,
//                        logit_scale, softcap, lse_square_scale, inplace_backward, compute_grad,
//                        grad_scale)
// -> (loss, z_loss, lse, total_weight, grad_input): cross_entropy_forward's arguments and results.
PyObject* forward_below_autograd(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const auto op = find_op<ForwardSignature>("fastce::cross_entropy_forward");
  Args a("forward_below_autograd", args, nargs, 12);
  const at::Tensor& input = a.tensor();
  const at::Tensor& target = a.tensor();
  const std::optional<at::Tensor> weight = a.optional_tensor();
  const int64_t reduction = a.integer(), ignore_index = a.integer();
  const double label_smoothing = a.real(), logit_scale = a.real();
  const std::optional<double> softcap = a.optional_real();
  const double lse_square_scale = a.real();
  const bool inplace_backward = a.flag(), compute_grad = a.flag();
  const double grad_scale = a.real();
  return wrap_all(call_below_autograd(op, input, target, weight, reduction, ignore_index, label_smoothing,
                                      logit_scale, softcap, lse_square_scale, inplace_backward,
                                      compute_grad, grad_scale));
  END_HANDLE_TH_ERRORS
}

// The arguments cross_entropy_backward and cross_entropy_backward_inplace share (their
// first 13), read in schema order (members initialize in declaration order).
struct BackwardArgs {
  explicit BackwardArgs(Args& a)
      : grad_loss(a.tensor()), grad_z_loss(a.tensor()), input(a.tensor()), target(a.tensor()),
        weight(a.optional_tensor()), lse(a.tensor()), total_weight(a.tensor()), reduction(a.integer()),
        ignore_index(a.integer()), label_smoothing(a.real()), logit_scale(a.real()),
        softcap(a.optional_real()), lse_square_scale(a.real()) {}
  template <class Op, class... Extra>
  auto call(const Op& op, Extra... extra) const {
    return call_below_autograd(op, grad_loss, grad_z_loss, input, target, weight, lse, total_weight, reduction,
                               ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale, extra...);
  }
  const at::Tensor& grad_loss;
  const at::Tensor& grad_z_loss;
  const at::Tensor& input;
  const at::Tensor& target;
  const std::optional<at::Tensor> weight;
  const at::Tensor& lse;
  const at::Tensor& total_weight;
  const int64_t reduction, ignore_index;
  const double label_smoothing, logit_scale;
  const std::optional<double> softcap;
  const double lse_square_scale;
};

// backward_below_autograd(grad_loss, grad_z_loss, input, target, weight, lse, total_weight,
//                         reduction, ignore_index, label_smoothing, logit_scale, softcap,
//                         lse_square_scale, compute_grad_target)
// -> (grad_input, grad_target): cross_entropy_backward's arguments and results.
PyObject* backward_below_autograd(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const auto op = find_op<BackwardSignature>("fastce::cross_entropy_backward");
  Args a("backward_below_autograd", args, nargs, 14);
  const BackwardArgs common(a);
  const bool compute_grad_target = a.flag();
  return wrap_all(common.call(op, compute_grad_target));
  END_HANDLE_TH_ERRORS
}

// backward_inplace_below_autograd(the same 13 arguments): cross_entropy_backward_inplace.
PyObject* backward_inplace_below_autograd(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const auto op = find_op<BackwardInplaceSignature>("fastce::cross_entropy_backward_inplace");
  Args a("backward_inplace_below_autograd", args, nargs, 13);
  BackwardArgs(a).call(op);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* empty_cache(PyObject* /*self*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  {
    pybind11::gil_scoped_release no_gil;
    cpu::release_kept_buffer();
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyCFunction fastcall(PyObject* (*f)(PyObject*, PyObject* const*, Py_ssize_t)) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

}  // namespace

PyMethodDef methods[] = {
    {"forward_below_autograd", fastcall(forward_below_autograd), METH_FASTCALL,
     "cross_entropy_forward below the Autograd key, without torch.ops's boxing"},
    {"backward_below_autograd", fastcall(backward_below_autograd), METH_FASTCALL,
     "cross_entropy_backward below the Autograd key, without torch.ops's boxing"},
    {"backward_inplace_below_autograd", fastcall(backward_inplace_below_autograd), METH_FASTCALL,
     "cross_entropy_backward_inplace below the Autograd key, without torch.ops's boxing"},
    {"empty_cache", empty_cache, METH_NOARGS, "releases the CPU gradient buffer kept for reuse"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace fastce

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastce::methods};
  return PyModule_Create(&module_def);
}
}
