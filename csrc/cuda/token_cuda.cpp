// CUDA driver of the token ops (host C++ on the LibTorch stable ABI): the checks of
// token_problem.cpp, then token.cu's kernels on the current stream. Nothing here reads device
// memory from the host (an index out of bounds is a device-side assert, as in torch.gather).
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>

#include "../token_problem.cpp"  // (this module's copy: see core.cpp)
#include "token_launch.h"

namespace fastce {
namespace {

cudaStream_t token_stream(const Tensor& on) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(on.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// The kernels' view: logits with unit class stride (and at most kTokenMaxLead leading dims, else
// a contiguous copy), the index as contiguous int64. Keeps the tensors it points into alive.
struct TokenView {
  cuda::TokenRows rows{};
  Tensor logits, index;

  TokenView(const Tensor& x, const Tensor& idx, const TokenShape& s, const TokenOptions& opt) {
    const int64_t lead = x.dim() - 1;
    const bool direct = (x.stride(lead) == 1 || s.classes <= 1) && lead <= cuda::kTokenMaxLead;
    logits = direct ? x : torch::stable::reshape(torch::stable::contiguous(x), {s.rows, s.classes});
    const Tensor i64 = idx.scalar_type() == ScalarType::Long ? idx : torch::stable::to(idx, ScalarType::Long);
    index = i64.is_contiguous() ? i64 : torch::stable::contiguous(i64);
    rows.dtype = kernel_dtype(s.dtype);
    rows.x = logits.const_data_ptr();
    rows.lead = int(logits.dim() - 1);
    for (int d = 0; d < rows.lead; ++d) {
      rows.sizes[d] = logits.size(d);
      rows.strides[d] = logits.stride(d);
    }
    rows.rows = s.rows;
    rows.classes = s.classes;
    rows.K = s.K;
    rows.index = index.const_data_ptr<int64_t>();
    rows.opt = opt;
  }
};

// An incoming tensor as double values in order on the logits' device (small: per row or token).
Tensor doubles_on(const Tensor& t, int64_t count, const char* what, const Tensor& logits) {
  FASTCE_CHECK(t.device() == logits.device(),
               "Expected all tensors to be on the same device, but found at least two devices, ",
               device_name(logits), " and ", device_name(t), "!");
  FASTCE_CHECK(t.numel() == count, what, ": expected ", count, " values, got a tensor of shape ", t.sizes());
  const Tensor d = t.scalar_type() == ScalarType::Double ? t : torch::stable::to(t, ScalarType::Double);
  return d.is_contiguous() ? d : torch::stable::contiguous(d);
}

// token_logprobs_forward(logits, index, <token options>, compute_entropy, compute_argmax)
//   -> (logprobs, entropy, lse, argmax)
void forward_kernel(StableIValue* stack, uint64_t, uint64_t) {
  Args a(stack);
  const Tensor logits = a.tensor(), index = a.tensor();
  const TokenOptions opt = read_token_options(a);
  const bool compute_entropy = a.flag(), compute_argmax = a.flag();
  const TokenShape s = check_token_args(logits, index);
  const torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  const TokenView view(logits, index, s, opt);
  Tensor logprobs = empty_on(logits, s.index_shape, s.acc_type);
  Tensor entropy = compute_entropy ? empty_on(logits, s.row_shape, s.acc_type) : empty_on(logits, {0}, s.acc_type);
  Tensor lse = empty_on(logits, s.row_shape, ScalarType::Double);
  // (new_empty: empty_on's host path sizes floating types only)
  Tensor argmax = torch::stable::new_empty(logits, compute_argmax ? s.row_shape : std::vector<int64_t>{0},
                                           ScalarType::Long);
  cuda::TokenForwardArgs f{};
  f.v = view.rows;
  f.logprobs = logprobs.mutable_data_ptr();
  f.entropy = compute_entropy ? entropy.mutable_data_ptr() : nullptr;
  f.lse = lse.mutable_data_ptr<double>();
  f.argmax = compute_argmax ? argmax.mutable_data_ptr<int64_t>() : nullptr;
  cuda::launch_token_forward(f, token_stream(logits));
  put_results(stack, logprobs, entropy, lse, argmax);
}

// token_logprobs_backward(grad_logprobs?, grad_entropy?, logits, index, lse, entropy,
//                         <token options>) -> grad_logits
void backward_kernel(StableIValue* stack, uint64_t, uint64_t) {
  Args a(stack);
  const std::optional<Tensor> grad_logprobs = a.optional_tensor(), grad_entropy = a.optional_tensor();
  const Tensor logits = a.tensor(), index = a.tensor(), lse = a.tensor(), entropy = a.tensor();
  const TokenOptions opt = read_token_options(a);
  const TokenShape s = check_token_args(logits, index);
  const torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  const TokenView view(logits, index, s, opt);
  const Tensor lse_d = doubles_on(lse, s.rows, "lse", logits);
  Tensor g_lp, g_h, ent;
  if (grad_logprobs) g_lp = doubles_on(*grad_logprobs, s.rows * s.K, "grad_logprobs", logits);
  if (grad_entropy) {
    g_h = doubles_on(*grad_entropy, s.rows, "grad_entropy", logits);
    ent = doubles_on(entropy, s.rows, "entropy", logits);
  }
  Tensor gx = empty_on(logits, {s.rows, s.classes}, s.dtype);
  cuda::TokenBackwardArgs b{};
  b.v = view.rows;
  b.grad_logprobs = grad_logprobs ? g_lp.const_data_ptr<double>() : nullptr;
  b.grad_entropy = grad_entropy ? g_h.const_data_ptr<double>() : nullptr;
  b.lse = lse_d.const_data_ptr<double>();
  b.entropy = grad_entropy ? ent.const_data_ptr<double>() : nullptr;
  b.gx = gx.mutable_data_ptr();
  cuda::launch_token_backward(b, token_stream(logits));
  put_results(stack, torch::stable::reshape(gx, logits.sizes()));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastce, CUDA, m) {
  m.impl("token_logprobs_forward", &forward_kernel);
  m.impl("token_logprobs_backward", &backward_kernel);
}

}  // namespace fastce
