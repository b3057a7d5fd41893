// CUDA backend driver (host C++): the same argument checks as the CPU backend (prepare()), then
// the kernels of forward.cu / backward.cu on the current stream. Nothing here reads
// device memory from the host, so every op is asynchronous and CUDA-graph capturable.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "../backward_ops.h"
#include "../cross_entropy.h"
#include "launch.h"

namespace fastce {
namespace {

cuda::Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cuda::Dtype::Float64;
    case at::kBFloat16: return cuda::Dtype::BFloat16;
    case at::kHalf: return cuda::Dtype::Float16;
    default: return cuda::Dtype::Float32;
  }
}

// SMs of a device, asked once (a host query: no stream work, fine during graph capture).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0: not asked yet
  int n = device >= 0 && device < int(cache.size()) ? cache[device].load() : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < int(cache.size())) cache[device].store(n);
  }
  return n;
}

void check_device(const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "Expected all tensors to be on the same device, but ",
              name, " is on ", t.device(), " and input on ", input.device());
}

// The kernels' view of a prepared problem. Keeps the tensors it points into alive.
struct View {
  cuda::Rows rows{};
  at::Tensor target;      // int64 class indices
  at::Tensor weight_sum;  // double scalar on the device

  View(const Problem& p, const Options& opt, cudaStream_t stream) {
    const at::Tensor& x = p.logits;
    rows.dtype = kernel_dtype(x.scalar_type());
    rows.x = x.data_ptr();
    rows.x_stride = x.stride(0);
    if (p.prob) {
      rows.y = p.target.data_ptr();
      rows.y_stride = p.target.stride(0);
    } else {
      target = p.target.to(at::kLong);  // int32/uint8 widened once, on the device
      rows.target = target.data_ptr<int64_t>();
    }
    rows.weight = p.weight.defined() ? p.weight.data_ptr() : nullptr;
    rows.rows = p.rows;
    rows.classes = p.classes;
    rows.ignore_index = opt.ignore_index;
    rows.label_smoothing = opt.label_smoothing;
    rows.logit_scale = opt.logit_scale;
    rows.softcap = opt.softcap;
    rows.lse_square_scale = opt.lse_square_scale;
    if (p.weight.defined() && opt.label_smoothing > 0) {
      weight_sum = at::empty({}, x.options().dtype(at::kDouble));
      cuda::launch_weight_sum(rows.dtype, rows.weight, p.classes, weight_sum.data_ptr<double>(), stream);
      rows.weight_sum = weight_sum.data_ptr<double>();
    }
    rows.chunk = cuda::plan_chunk(p.rows, p.classes, rows.dtype, sm_count(x.get_device()));
    rows.chunks = p.classes > rows.chunk ? (p.classes + rows.chunk - 1) / rows.chunk : 1;
  }
};

void backward_into(const at::Tensor& grad_loss, const at::Tensor& grad_zloss, const at::Tensor& input,
                   const Problem& p, const Options& opt, const at::Tensor& lse,
                   const at::Tensor& total_weight, at::Tensor& gx2d, at::Tensor* gy2d);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    std::optional<double> softcap, double lse_square_scale, bool /*inplace_backward*/,
    bool compute_grad, double grad_scale) {
  const Options opt = make_options(reduction, ignore_index, label_smoothing, logit_scale, softcap,
                                   lse_square_scale);
  const c10::cuda::CUDAGuard guard(input.device());
  const Problem p = prepare(input, target, weight, opt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const View view(p, opt, stream);
  const auto acc = input.options().dtype(p.acc_type);

  at::Tensor lse = at::empty({p.rows}, input.options().dtype(at::kDouble)), row_loss = at::empty({p.rows}, acc);
  at::Tensor row_zloss = at::empty({p.rows}, acc), row_weight = at::empty({p.rows}, acc);
  at::Tensor total_weight = at::empty({}, acc);
  at::Tensor partial;
  if (view.rows.chunks > 1) partial = at::empty({p.rows * view.rows.chunks * 5}, acc);
  at::Tensor loss, zloss;
  if (reduction != kNone) {
    loss = at::empty({}, input.options());
    zloss = at::empty({}, input.options());
  }
  cuda::ForwardArgs a{};
  a.v = view.rows;
  a.reduction = reduction;
  a.lse = lse.data_ptr();
  a.row_loss = row_loss.data_ptr();
  a.row_zloss = row_zloss.data_ptr();
  a.row_weight = row_weight.data_ptr();
  a.partial = partial.defined() ? partial.data_ptr() : nullptr;
  a.loss_out = loss.defined() ? loss.data_ptr() : nullptr;
  a.zloss_out = zloss.defined() ? zloss.data_ptr() : nullptr;
  a.total_weight = total_weight.data_ptr();
  cuda::launch_forward(a, stream);

  if (reduction == kNone) {
    loss = row_loss.to(input.scalar_type()).view(p.row_shape);
    zloss = row_zloss.to(input.scalar_type()).view(p.row_shape);
  }
  // compute_grad: the backward kernel for grad_loss = grad_scale, queued right after (no fused
  // kernel on CUDA yet; the eager fast path asks for it on the CPU only).
  at::Tensor grad = at::empty({0}, input.options());
  if (compute_grad) {
    const int64_t n_grad = reduction == kNone ? p.rows : 1;
    at::Tensor gx2d = at::empty({p.rows, p.classes}, input.options());
    backward_into(at::full({n_grad}, grad_scale, acc), at::zeros({n_grad}, acc), input, p, opt, lse, total_weight, gx2d,
                  nullptr);
    grad = grad_to_input_layout(gx2d, input);
  }
  // The op's lse is float64 on every device: z - lse must not lose what a float lse rounds away
  // (|lse| * 2^-24); the backward splits it in two floats (docs/CUDA.md).
  return {loss, zloss, lse.view(p.row_shape), total_weight, grad};
}

// Writes the gradient of the logits (and of probability targets) into gx2d / gy2d.
void backward_into(const at::Tensor& grad_loss, const at::Tensor& grad_zloss, const at::Tensor& input,
                   const Problem& p, const Options& opt, const at::Tensor& lse,
                   const at::Tensor& total_weight, at::Tensor& gx2d, at::Tensor* gy2d) {
  for (const auto& [t, name] : {std::pair{&grad_loss, "grad_loss"}, std::pair{&grad_zloss, "grad_z_loss"},
                                std::pair{&lse, "lse"}, std::pair{&total_weight, "total_weight"}})
    check_device(input, *t, name);
  const int64_t grad_numel = opt.reduction == kNone ? p.rows : 1;
  TORCH_CHECK(grad_loss.numel() == grad_numel && grad_zloss.numel() == grad_numel,
              "cross_entropy_backward: expected gradients with ", grad_numel, " elements, got ",
              grad_loss.numel(), " and ", grad_zloss.numel());
  TORCH_CHECK(lse.numel() == p.rows && total_weight.numel() == 1,
              "cross_entropy_backward: lse must have one value per row and total_weight one value");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const View view(p, opt, stream);
  const at::Tensor gl = grad_loss.to(p.acc_type).contiguous();
  const at::Tensor gz = grad_zloss.to(p.acc_type).contiguous();
  const at::Tensor lse_a = lse.to(at::kDouble).contiguous();
  const at::Tensor tw = total_weight.to(p.acc_type);
  const auto acc = input.options().dtype(p.acc_type);
  at::Tensor sum_wy, others, x_target, lse_parts = at::empty({p.rows, 2}, acc);
  if (p.prob) {
    sum_wy = at::empty({p.rows}, acc);
  } else {
    others = at::empty({p.rows * view.rows.chunks}, acc);
    x_target = at::empty({p.rows}, acc);
  }

  cuda::BackwardArgs a{};
  a.v = view.rows;
  a.reduction = opt.reduction;
  a.grad_loss = gl.data_ptr();
  a.grad_zloss = gz.data_ptr();
  a.lse = lse_a.data_ptr();
  a.total_weight = tw.data_ptr();
  a.sum_wy = sum_wy.defined() ? sum_wy.data_ptr() : nullptr;
  a.others = others.defined() ? others.data_ptr() : nullptr;
  a.x_target = x_target.defined() ? x_target.data_ptr() : nullptr;
  a.lse_parts = lse_parts.data_ptr();
  a.gx = gx2d.data_ptr();
  a.gx_stride = gx2d.stride(0);
  a.gy = gy2d ? gy2d->data_ptr() : nullptr;
  a.gy_stride = gy2d ? gy2d->stride(0) : 0;
  cuda::launch_backward(a, stream);
}

struct CudaBackend {
  static at::Tensor new_grad_buffer(int64_t rows, int64_t classes, const at::TensorOptions& options) {
    return at::empty({rows, classes}, options);
  }
  static constexpr auto backward_into = &fastce::backward_into;
};

}  // namespace

TORCH_LIBRARY_IMPL(fastce, CUDA, m) {
  m.impl("cross_entropy_forward", &forward_cuda);
  m.impl("cross_entropy_backward", &backward_op<CudaBackend>);
  m.impl("cross_entropy_backward_inplace", &backward_inplace_op<CudaBackend>);
}

}  // namespace fastce
