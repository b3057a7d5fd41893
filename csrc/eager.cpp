// The eager fast path's door into the ops: fastce._C.forward_below_autograd calls
// fastce::cross_entropy_forward through the dispatcher (so the CPU or CUDA kernel runs, as
// with torch.ops), below the Autograd key, without torch.ops's generic boxing. On a 64x10
// batch that boxing (11 arguments and 5 results through IValues) costs more than the
// kernel; here the arguments go straight to the typed call.
//
// The Python caller (_ops.cross_entropy_loss) has already normalized the argument types;
// the op itself validates the values, and its errors reach Python as the same exceptions
// torch.ops raises (HANDLE_TH_ERRORS).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <tuple>

namespace fastce {
namespace {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, double,
    double, std::optional<double>, double, bool, bool);

const at::Tensor& tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "forward_below_autograd: ", name, " must be a Tensor");
  return THPVariable_Unpack(obj);
}

int64_t int_arg(PyObject* obj) {
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

double float_arg(PyObject* obj) {
  const double v = PyFloat_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

bool bool_arg(PyObject* obj) {
  const int v = PyObject_IsTrue(obj);
  if (v < 0) throw python_error();
  return v != 0;
}

// forward_below_autograd(input, target, weight, reduction, ignore_index, label_smoothing,
//                        logit_scale, softcap, lse_square_scale, inplace_backward, compute_grad)
// -> (loss, z_loss, lse, total_weight, grad_input): the op's arguments and results.
PyObject* forward_below_autograd(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 11, "forward_below_autograd takes 11 arguments, got ", nargs);
  const at::Tensor& input = tensor_arg(args[0], "input");
  const at::Tensor& target = tensor_arg(args[1], "target");
  std::optional<at::Tensor> weight;
  if (args[2] != Py_None) weight = tensor_arg(args[2], "weight");
  const int64_t reduction = int_arg(args[3]), ignore_index = int_arg(args[4]);
  const double label_smoothing = float_arg(args[5]), logit_scale = float_arg(args[6]);
  std::optional<double> softcap;
  if (args[7] != Py_None) softcap = float_arg(args[7]);
  const double lse_square_scale = float_arg(args[8]);
  const bool inplace_backward = bool_arg(args[9]), compute_grad = bool_arg(args[10]);

  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastce::cross_entropy_forward", "")
                             .typed<ForwardSignature>();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    out = op.call(input, target, weight, reduction, ignore_index, label_smoothing, logit_scale, softcap,
                  lse_square_scale, inplace_backward, compute_grad);
  }
  PyObject* result = PyTuple_New(5);
  if (!result) throw python_error();
  auto wrap = [&](int i, at::Tensor& t) {
    PyObject* item = THPVariable_Wrap(std::move(t));
    if (!item) {
      Py_DECREF(result);
      throw python_error();
    }
    PyTuple_SET_ITEM(result, i, item);  // steals the reference
  };
  auto& [loss, z_loss, lse, total_weight, grad_input] = out;
  wrap(0, loss), wrap(1, z_loss), wrap(2, lse), wrap(3, total_weight), wrap(4, grad_input);
  return result;
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef eager_methods[] = {
    {"forward_below_autograd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward_below_autograd)),
     METH_FASTCALL, "cross_entropy_forward below the Autograd key, without torch.ops's boxing"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace fastce
