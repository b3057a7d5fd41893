// The op schemas of the fastce library (one definition for every backend). Kernels: cpu/,
// cuda/ (the boxed kernels: op_kernels.h). Autograd and fake kernels: python/fastce/_ops.py.
//
// Importing fastce._C loads this library (the module itself is empty: the ops are reached
// through torch.ops.fastce), so it uses Python's limited API only and one build serves every
// Python >= 3.10.
#include <Python.h>

#include <cstdlib>
#include <string>

#include "cpu/grad_buffer.h"
#include "cpu/row_kernels.h"
#include "torch_api.h"

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace fastce {
namespace {

// The options every loss op takes after its tensors, in LossOptions' order (rules.h), and
// python/fastce/_ops.py's LossOptions (a test checks that the three agree).
const std::string kOptionsSchema =
    "int reduction=1, int ignore_index=-100, float label_smoothing=0.0, float logit_scale=1.0, "
    "float? softcap=None, float lse_square_scale=0.0, int class_offset=0, int vocab_size=-1";

// The options of the token ops after their tensors, in TokenOptions' order (rules.h), and
// python/fastce/token.py's TokenOptions. The transforms apply in this order: logit_scale,
// softcap, then / temperature.
const std::string kTokenOptionsSchema = "float temperature=1.0, float logit_scale=1.0, float? softcap=None";

// The instruction set the CPU kernels use now (FASTCE_CPU_ISA can force one).
void cpu_isa(StableIValue* stack, uint64_t, uint64_t) {
  const cpu::RowKernels* k = cpu::select_kernels(std::getenv("FASTCE_CPU_ISA"));
  put_results(stack, std::string(k ? k->isa : "unsupported"));
}

void empty_cache(StableIValue*, uint64_t, uint64_t) { cpu::release_kept_buffer(); }

}  // namespace

STABLE_TORCH_LIBRARY(fastce, m) {
  // loss and z_loss: reduced (0-d) or per row (reduction=0); lse: float64 log-sum-exp of
  // each row's transformed logits (float64 keeps z - lse exact for large logits); for a slice
  // of the vocabulary (vocab_size >= 0) (*rows, 3), rules.h's SliceLse, and the backward ops
  // take the whole vocabulary's lse as (shift, rel) pairs, (*rows, 2) (op_kernels.h);
  // total_weight: the mean's two divisors (rules.h: Divisors), the total weight of the
  // cross-entropy and the count of non-ignored rows of the z-loss (shape (2,), float32,
  // float64 for float64 input). loss and z_loss are of loss_dtype (default: the input's).
  // grad_input: with compute_grad, the gradient of the logits for grad_loss = 1 and grad_z_loss = 0 (what
  // cross_entropy_backward returns for them, bit for bit), computed while the rows are in
  // cache; else empty.
  m.def(("cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, " + kOptionsSchema +
         ", bool compute_grad=False, ScalarType? loss_dtype=None) -> (Tensor loss, Tensor z_loss, Tensor lse, "
         "Tensor total_weight, "
         "Tensor grad_input)").c_str());
  // grad_target is empty unless compute_grad_target and the target holds probabilities.
  m.def(("cross_entropy_backward(Tensor grad_loss, Tensor grad_z_loss, Tensor input, Tensor target, "
         "Tensor? weight, Tensor lse, Tensor total_weight, " + kOptionsSchema +
         ", bool compute_grad_target=False) -> (Tensor grad_input, Tensor grad_target)").c_str());
  // Writes the gradient of the logits into the logits' own storage.
  m.def(("cross_entropy_backward_inplace(Tensor grad_loss, Tensor grad_z_loss, Tensor(a!) input, "
         "Tensor target, Tensor? weight, Tensor lse, Tensor total_weight, " + kOptionsSchema + ") -> ()").c_str());
  // Fused linear + cross-entropy over row chunks (python/fastce/linear.py: the implementation
  // is torch matmuls around the ops above, so it is registered from Python for every device).
  // loss; lse of each row (for reduction=0, else empty); for reduction 1/2 the requested
  // gradients for grad_loss = 1 (empty where not requested). loss is of loss_dtype (default: the
  // input's).
  const std::string linear_flags =
      ", int? chunk_size=None, bool grad_input=False, bool grad_linear_weight=False, "
      "bool grad_linear_bias=False)";
  m.def(("linear_cross_entropy_forward(Tensor input, Tensor linear_weight, Tensor? linear_bias, "
         "Tensor target, Tensor? weight, " + kOptionsSchema + linear_flags.substr(0, linear_flags.size() - 1) +
         ", ScalarType? loss_dtype=None) -> (Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_linear_weight, "
         "Tensor grad_linear_bias)").c_str());
  // reduction=0: the requested gradients for a per-row grad_loss (the logits recomputed).
  m.def(("linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor linear_weight, "
         "Tensor? linear_bias, Tensor target, Tensor? weight, Tensor lse, " + kOptionsSchema +
         linear_flags + " -> (Tensor grad_input, Tensor grad_linear_weight, Tensor grad_linear_bias)").c_str());
  // Per-token outputs (python/fastce/token.py). logits (*, V); index (*) or (*, K) class
  // indices. logprobs: log_softmax(z)[index], shaped as index; entropy: -sum p log p per row
  // (with compute_entropy, else empty); lse: float64 log-sum-exp of each row's z (for the
  // backward); argmax: int64 index of each row's largest z (first on ties, a NaN first, as
  // torch.argmax; with compute_argmax, else empty). logprobs and entropy in float32 (float64 for
  // float64 logits).
  m.def(("token_logprobs_forward(Tensor logits, Tensor index, " + kTokenOptionsSchema +
         ", bool compute_entropy=False, bool compute_argmax=False) -> (Tensor logprobs, Tensor entropy, "
         "Tensor lse, Tensor argmax)").c_str());
  // The logits' gradient (their dtype and shape, contiguous) for the gradients of logprobs
  // and entropy (either may be None).
  m.def(("token_logprobs_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor index, "
         "Tensor lse, Tensor entropy, " + kTokenOptionsSchema + ") -> Tensor grad_logits").c_str());
  // The same with the LM head fused (python/fastce/token.py, over row chunks): input (N, H),
  // linear_weight (V, H), linear_bias (V) or None; the logits are never materialized whole.
  m.def(("linear_token_logprobs_forward(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor index, " +
         kTokenOptionsSchema + ", bool compute_entropy=True, int? chunk_size=None) -> "
         "(Tensor logprobs, Tensor entropy, Tensor lse)").c_str());
  m.def(("linear_token_logprobs_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor input, "
         "Tensor linear_weight, Tensor? linear_bias, Tensor index, Tensor lse, Tensor entropy, " +
         kTokenOptionsSchema + ", int? chunk_size=None, bool grad_input=False, bool grad_linear_weight=False, "
         "bool grad_linear_bias=False) -> (Tensor grad_input, Tensor grad_linear_weight, "
         "Tensor grad_linear_bias)").c_str());
  m.def("cpu_isa() -> str");
  // Unmaps the CPU gradient buffer kept for reuse (cpu/grad_buffer.cpp).
  m.def("empty_cache() -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(fastce, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa);
  m.impl("empty_cache", &empty_cache);
}

}  // namespace fastce
