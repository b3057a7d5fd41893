// The op schemas of the fastce library (one definition for every backend). Kernels: cpu/,
// cuda/. Autograd and fake (meta) kernels: python/fastce/_ops.py. The fastce._C module
// whose import loads them: python_module.cpp.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu/row_kernels.h"

namespace fastce {

// The instruction set the CPU kernels use now (FASTCE_CPU_ISA can force one).
std::string cpu_isa() {
  const cpu::RowKernels* k = cpu::select_kernels(std::getenv("FASTCE_CPU_ISA"));
  return k ? k->isa : "unsupported";
}

TORCH_LIBRARY(fastce, m) {
  // loss and z_loss: reduced (0-d) or per row (reduction=0); lse: float64 log-sum-exp of
  // each row's transformed logits (float64 keeps z - lse exact for large logits);
  // total_weight: the mean's divisor (float32, float64 for float64 input).
  // reduction: 0 none, 1 mean, 2 sum (torch's enum). grad_input: with compute_grad, the
  // gradient of the logits for grad_loss = grad_scale (every element of it) and grad_z_loss = 0
  // (what cross_entropy_backward returns for them, bit for bit), computed while the rows are
  // in cache; else empty.
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float logit_scale, float? softcap, "
      "float lse_square_scale, bool inplace_backward, bool compute_grad=False, float grad_scale=1.0) "
      "-> (Tensor loss, Tensor z_loss, Tensor lse, Tensor total_weight, Tensor grad_input)");
  // grad_target is empty unless compute_grad_target and the target holds probabilities.
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor grad_z_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor lse, Tensor total_weight, int reduction, int ignore_index, "
      "float label_smoothing, float logit_scale, float? softcap, float lse_square_scale, "
      "bool compute_grad_target) -> (Tensor grad_input, Tensor grad_target)");
  // Writes the gradient of the logits into the logits' own storage.
  m.def(
      "cross_entropy_backward_inplace(Tensor grad_loss, Tensor grad_z_loss, Tensor(a!) input, "
      "Tensor target, Tensor? weight, Tensor lse, Tensor total_weight, int reduction, "
      "int ignore_index, float label_smoothing, float logit_scale, float? softcap, "
      "float lse_square_scale) -> ()");
  m.def("cpu_isa() -> str", &cpu_isa);
}

}  // namespace fastce
