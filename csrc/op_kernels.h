// The boxed kernels of the three loss ops, the same for every backend: they read the
// arguments (the options in one place: read_options), validate them (prepare), and call the
// backend. A backend supplies
//   static ForwardResult forward(const Tensor& input, const Problem&, const LossOptions&, bool compute_grad,
//                                ScalarType loss_dtype);
//   static Tensor new_grad_buffer(const Problem&, const Tensor& input);
//   static void backward_into(const BackwardArgs&, const Problem&, Tensor& grad2d, Tensor* grad_target2d);
//   struct Guard { explicit Guard(const Tensor& input); };  // the device to run on
// and, optionally, `static constexpr int64_t kSpatialMinInner` (see prepare: a backend with
// spatial kernels; its new_grad_buffer then gives a spatial problem a buffer of the input's shape).
#pragma once
#include "problem.h"

namespace fastce {

struct ForwardResult {
  Tensor loss, z_loss, lse, total_weight, grad_input;
};

// What the backward ops take besides the problem. lse: one float64 per row; for a slice of
// the vocabulary (opt.vocab_size >= 0) the whole vocabulary's lse as (shift, rel) pairs, the
// first two of lse_columns values per row (see slice_lse_columns).
struct BackwardArgs {
  Tensor grad_loss, grad_z_loss, lse, total_weight;
  LossOptions opt;
  int64_t lse_columns = 1;
};

namespace detail {

template <class Backend>
constexpr int64_t spatial_min_inner() {
  if constexpr (requires { Backend::kSpatialMinInner; }) return Backend::kSpatialMinInner;
  else return 0;
}

template <class Backend>
Problem prepare_for(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                    const LossOptions& opt) {
  return prepare(input, target, weight, opt, spatial_min_inner<Backend>());
}

struct LossCall {
  Tensor input, target;
  std::optional<Tensor> weight;
  LossOptions opt;
};

inline LossCall read_loss_call(Args& a) {
  LossCall c{a.tensor(), a.tensor(), a.optional_tensor(), {}};
  c.opt = read_options(a);
  return c;
}

// The arguments both backward ops start with: (grad_loss, grad_z_loss, input, target, weight,
// lse, total_weight, <options>).
struct BackwardCall {
  LossCall loss;
  BackwardArgs args;
};

inline BackwardCall read_backward_call(Args& a) {
  BackwardCall c;
  c.args.grad_loss = a.tensor();
  c.args.grad_z_loss = a.tensor();
  c.loss.input = a.tensor();
  c.loss.target = a.tensor();
  c.loss.weight = a.optional_tensor();
  c.args.lse = a.tensor();
  c.args.total_weight = a.tensor();
  c.args.opt = c.loss.opt = read_options(a);
  return c;
}

// The backward's lse for a slice of the vocabulary: (*rows, 2), the whole vocabulary's lse as
// shift + rel (parallel.py merges it from the slices'), or the forward's (*rows, 3) slice
// output as is (then the gradient is against the slice's own lse). Returns the values per row.
inline int64_t slice_lse_columns(const Tensor& lse, const Problem& p) {
  const int64_t k = lse.dim() >= 1 ? lse.size(lse.dim() - 1) : 0;
  FASTCE_CHECK_VALUE((k == 2 || k == 3) && lse.numel() == p.rows * k,
                     "lse of a slice of the vocabulary (vocab_size) must hold (shift, rel) for each of its ",
                     p.rows, " rows, shape (*rows, 2), got a tensor of shape ", lse.sizes());
  return k;
}

inline void set_lse_columns(BackwardArgs& b, const Problem& p) {
  b.lse_columns = b.opt.vocab_size >= 0 ? slice_lse_columns(b.lse, p) : 1;
}

// Rows whose memory overlaps (an expanded tensor) cannot take their gradient in place.
inline bool rows_overlap(const Problem& p) {
  return p.rows > 1 && p.logits.stride(0) < std::max<int64_t>(p.classes, 1);
}

}  // namespace detail

// cross_entropy_forward(input, target, weight, <options>, compute_grad, loss_dtype)
//   -> (loss, z_loss, lse, total_weight, grad_input)
// For a slice of the vocabulary (vocab_size >= 0), lse is (*rows, 3): rules.h's SliceLse
// (max, log-sum, weight of the lse in the loss), what the merge of the slices needs; the loss
// is against the slice's own lse.
template <class Backend>
void forward_kernel(StableIValue* stack, uint64_t, uint64_t) {
  Args a(stack);
  const detail::LossCall c = detail::read_loss_call(a);
  const bool compute_grad = a.flag();
  const std::optional<ScalarType> loss_dtype = a.optional_dtype();
  const typename Backend::Guard guard(c.input);
  const Problem p = detail::prepare_for<Backend>(c.input, c.target, c.weight, c.opt);
  FASTCE_CHECK_VALUE(!loss_dtype.has_value() || is_floating(*loss_dtype),
                     "loss_dtype must be a floating point dtype, got ", *loss_dtype);
  ForwardResult r = Backend::forward(c.input, p, c.opt, compute_grad, loss_dtype.value_or(p.dtype));
  put_results(stack, r.loss, r.z_loss, r.lse, r.total_weight, r.grad_input);
}

// cross_entropy_backward(grad_loss, grad_z_loss, input, target, weight, lse, total_weight,
//                        <options>, compute_grad_target) -> (grad_input, grad_target)
template <class Backend>
void backward_kernel(StableIValue* stack, uint64_t, uint64_t) {
  Args a(stack);
  detail::BackwardCall c = detail::read_backward_call(a);
  const BackwardArgs& b = c.args;
  const Tensor& input = c.loss.input;
  const bool compute_grad_target = a.flag();
  const typename Backend::Guard guard(input);
  const Problem p = detail::prepare_for<Backend>(input, c.loss.target, c.loss.weight, b.opt);
  detail::set_lse_columns(c.args, p);
  Tensor gx2d = Backend::new_grad_buffer(p, input);
  const bool grad_y = compute_grad_target && p.prob;
  Tensor gy2d = grad_y ? Backend::new_grad_buffer(p, input) : empty_on(input, {0}, p.dtype);
  Backend::backward_into(b, p, gx2d, grad_y ? &gy2d : nullptr);
  put_results(stack, grad_to_input_layout(gx2d, input), grad_y ? grad_to_input_layout(gy2d, input) : gy2d);
}

// cross_entropy_backward_inplace(grad_loss, grad_z_loss, input(a!), target, weight, lse,
//                                total_weight, <options>) -> ()
template <class Backend>
void backward_inplace_kernel(StableIValue* stack, uint64_t, uint64_t) {
  Args a(stack);
  detail::BackwardCall c = detail::read_backward_call(a);
  const BackwardArgs& b = c.args;
  Tensor& input = c.loss.input;
  const typename Backend::Guard guard(input);
  const Problem p = detail::prepare_for<Backend>(input, c.loss.target, c.loss.weight, b.opt);
  detail::set_lse_columns(c.args, p);
  // (A spatial problem's logits are a view of the input in its own layout.)
  const bool same_storage = (input.dim() <= 2 || (p.spatial && input.is_contiguous())) &&
                            p.logits.data_ptr() == input.data_ptr() &&
                            (p.classes <= 1 || p.spatial || p.logits.stride(1) == 1);
  if (same_storage && !detail::rows_overlap(p)) {
    Tensor gx2d = p.logits;
    Backend::backward_into(b, p, gx2d, nullptr);
    return;
  }
  // torch's error for writing into memory that several elements share.
  FASTCE_CHECK(!same_storage || !detail::rows_overlap(p),
               "unsupported operation: some elements of the input tensor and the written-to tensor refer to a "
               "single memory location. Please clone() the tensor before performing the operation.");
  // The kernels' view of these logits is a copy: compute there, then copy back.
  Tensor gx2d = Backend::new_grad_buffer(p, input);
  Backend::backward_into(b, p, gx2d, nullptr);
  torch::stable::copy_(input, grad_to_input_layout(gx2d, input));
}

}  // namespace fastce
