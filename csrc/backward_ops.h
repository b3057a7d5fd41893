// The bodies of the two backward ops, the same for every backend. A backend supplies
//   static at::Tensor new_grad_buffer(int64_t rows, int64_t classes, const at::TensorOptions&);
//   static void backward_into(grad_loss, grad_z_loss, input, Problem, Options, lse,
//                             total_weight, at::Tensor& grad2d, at::Tensor* grad_target2d);
#pragma once
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>

#include <tuple>

#include "cross_entropy.h"

namespace fastce {

template <class Backend>
std::tuple<at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_loss, const at::Tensor& grad_zloss, const at::Tensor& input,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
    const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index, double label_smoothing,
    double logit_scale, std::optional<double> softcap, double lse_square_scale,
    bool compute_grad_target) {
  const Options opt = make_options(reduction, ignore_index, label_smoothing, logit_scale, softcap,
                                   lse_square_scale);
  const c10::DeviceGuard guard(input.device());
  const Problem p = prepare(input, target, weight, opt);
  at::Tensor gx2d = Backend::new_grad_buffer(p.rows, p.classes, input.options());
  at::Tensor gy2d;
  const bool grad_y = compute_grad_target && p.prob;
  if (grad_y) gy2d = Backend::new_grad_buffer(p.rows, p.classes, input.options());
  Backend::backward_into(grad_loss, grad_zloss, input, p, opt, lse, total_weight, gx2d,
                         grad_y ? &gy2d : nullptr);
  at::Tensor grad_target = grad_y ? grad_to_input_layout(gy2d, input) : at::empty({0}, input.options());
  return {grad_to_input_layout(gx2d, input), grad_target};
}

template <class Backend>
void backward_inplace_op(const at::Tensor& grad_loss, const at::Tensor& grad_zloss,
                         const at::Tensor& input, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                         const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index,
                         double label_smoothing, double logit_scale, std::optional<double> softcap,
                         double lse_square_scale) {
  const Options opt = make_options(reduction, ignore_index, label_smoothing, logit_scale, softcap,
                                   lse_square_scale);
  const c10::DeviceGuard guard(input.device());
  const Problem p = prepare(input, target, weight, opt);
  // (Rows that share memory, e.g. an expanded tensor, take the copy-back path, whose copy_
  // raises torch's error for writing into overlapping memory.)
  const bool same_storage = input.dim() <= 2 && p.logits.data_ptr() == input.data_ptr() &&
                            (p.classes <= 1 || p.logits.stride(1) == 1) &&
                            at::has_internal_overlap(input) == at::MemOverlap::No;
  if (same_storage) {
    at::Tensor gx2d = p.logits;
    Backend::backward_into(grad_loss, grad_zloss, input, p, opt, lse, total_weight, gx2d, nullptr);
    return;
  }
  // The kernels' view of these logits is a copy: compute there, then copy back.
  at::Tensor gx2d = Backend::new_grad_buffer(p.rows, p.classes, input.options());
  Backend::backward_into(grad_loss, grad_zloss, input, p, opt, lse, total_weight, gx2d, nullptr);
  input.copy_(grad_to_input_layout(gx2d, input));
}

}  // namespace fastce
