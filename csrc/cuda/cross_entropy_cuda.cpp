// CUDA backend driver (host C++ on the LibTorch stable ABI): the boxed kernels of op_kernels.h
// (the same argument checks as the CPU backend: prepare()), then the kernels of forward.cu /
// backward.cu on the current stream. Nothing here reads device memory from the host, so every
// op is asynchronous and CUDA-graph capturable.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>

#include <array>
#include <atomic>

#include "../op_kernels.h"
#include "launch.h"

namespace fastce {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  FASTCE_CHECK(e == cudaSuccess, "fastce: ", what, ": ", cudaGetErrorString(e));
}

cudaStream_t current_stream(const Tensor& on) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(on.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// SMs of a device, asked once (a host query: no stream work, fine during graph capture).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0: not asked yet
  const bool cached = device >= 0 && device < int(cache.size());
  int n = cached ? cache[device].load() : 0;
  if (n == 0) {
    check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "SM count");
    if (cached) cache[device].store(n);
  }
  return n;
}

// The kernels' view of a prepared problem. Keeps the tensors it points into alive.
struct View {
  cuda::Rows rows{};
  Tensor target;      // int64 class indices
  Tensor weight_sum;  // double scalar on the device

  View(const Problem& p, const LossOptions& opt, cudaStream_t stream) {
    const Tensor& x = p.logits;
    rows.dtype = kernel_dtype(p.dtype);
    rows.x = x.const_data_ptr();
    rows.x_stride = x.stride(0);
    if (p.prob) {
      rows.y = p.target.const_data_ptr();
      rows.y_stride = p.target.stride(0);
    } else {
      target = torch::stable::to(p.target, ScalarType::Long);  // int32/uint8 widened once, on the device
      rows.target = target.const_data_ptr<int64_t>();
    }
    rows.weight = p.weight.has_value() ? p.weight->const_data_ptr() : nullptr;
    rows.rows = p.rows;
    rows.classes = p.classes;
    rows.opt = opt;
    if (p.weight.has_value() && opt.label_smoothing > 0) {
      weight_sum = empty_on(x, {}, ScalarType::Double);
      cuda::launch_weight_sum(rows.dtype, rows.weight, p.classes, weight_sum.mutable_data_ptr<double>(), stream);
      rows.weight_sum = weight_sum.const_data_ptr<double>();
    }
    rows.chunk = cuda::plan_chunk(p.rows, p.classes, rows.dtype, sm_count(x.get_device_index()));
    rows.chunks = p.classes > rows.chunk ? (p.classes + rows.chunk - 1) / rows.chunk : 1;
  }
};

// An incoming tensor of the backward as the kernels read it: on the logits' device, `count`
// values in order, of a floating dtype (as the CPU backend's to_doubles takes them).
Tensor incoming(const Tensor& t, int64_t count, const char* what, const Tensor& logits) {
  FASTCE_CHECK(t.device() == logits.device(),
               "Expected all tensors to be on the same device, but found at least two devices, ",
               device_name(logits), " and ", device_name(t), "!");
  FASTCE_CHECK(t.numel() == count, what, ": expected ", count, " values, got a tensor of shape ", t.sizes());
  const Tensor f = is_floating(t.scalar_type()) ? t : torch::stable::to(t, ScalarType::Double);
  return f.is_contiguous() ? f : torch::stable::contiguous(f);
}
cuda::Values values_of(const Tensor& t) { return {t.const_data_ptr(), kernel_dtype(t.scalar_type())}; }

// A vocabulary slice's (rows, 2 or 3) float64 lse as the kernels read it: contiguous (shift, rel) pairs.
Tensor lse_pairs(Tensor lse2d) {
  if (lse2d.size(1) != 2) lse2d = torch::stable::narrow(lse2d, 1, 0, 2);
  return lse2d.is_contiguous() ? lse2d : torch::stable::contiguous(lse2d);
}

// The backward's kernels: the gradient of the logits into gx2d (and of probability targets into
// gy2d) for incoming gradients grad_loss / grad_zloss (absent: the unit gradient).
void launch_gradient(const View& view, const Problem& p, cuda::Values grad_loss, cuda::Values grad_zloss,
                     cuda::Values total_weight, const Tensor& lse, Tensor& gx2d, Tensor* gy2d, cudaStream_t stream) {
  cuda::BackwardArgs a{};
  a.v = view.rows;
  a.grad_loss = grad_loss;
  a.grad_zloss = grad_zloss;
  a.total_weight = total_weight;
  a.lse = lse.const_data_ptr<double>();
  Tensor sum_wy, huge;  // split rows' scratch (a whole row's warp keeps these in registers)
  const bool split = a.v.chunks > 1;
  if (split && p.prob) {
    sum_wy = empty_on(gx2d, {p.rows}, ScalarType::Double);
    a.sum_wy = sum_wy.mutable_data_ptr<double>();
  }
  if (split && a.v.opt.vocab_size < 0) {  // a vocabulary slice's lse is the whole vocabulary's: kept as given
    huge = empty_on(gx2d, {p.rows, 2}, ScalarType::Double);
    a.huge_lse = reinterpret_cast<RowLse*>(huge.mutable_data_ptr<double>());
  }
  a.gx = gx2d.mutable_data_ptr();
  a.gx_stride = gx2d.stride(0);
  a.gy = gy2d ? gy2d->mutable_data_ptr() : nullptr;
  a.gy_stride = gy2d ? gy2d->stride(0) : 0;
  cuda::launch_backward(a, stream);
}

struct Cuda {
  struct Guard {
    torch::stable::accelerator::DeviceGuard guard;
    explicit Guard(const Tensor& input) : guard(input.get_device_index()) {}
  };

  static Tensor new_grad_buffer(const Problem& p, const Tensor& input) {
    return empty_on(input, {p.rows, p.classes}, p.dtype);
  }

  // compute_grad: also the gradient for grad_loss = 1 and grad_z_loss = 0, by the backward's
  // kernels queued right after the forward's (the same kernels and values as the backward op).
  static ForwardResult forward(const Tensor& input, const Problem& p, const LossOptions& opt, bool compute_grad,
                               ScalarType loss_dtype) {
    const cudaStream_t stream = current_stream(input);
    const View view(p, opt, stream);
    const bool reduced = opt.reduction != kNone;
    ForwardResult out;
    // 'none': the kernels write each row's loss and z-loss in loss_dtype, the outputs
    // themselves; 'mean'/'sum': per-row doubles for the fixed-order reduction.
    const bool slice = opt.vocab_size >= 0;  // lse: rules.h's SliceLse per row
    Tensor lse = empty_on(input, {p.rows, slice ? 3 : 1}, ScalarType::Double);
    Tensor row_weight = empty_on(input, {p.rows}, ScalarType::Double);
    Tensor row_loss, row_zloss, partial, reduce_partial;
    out.total_weight = empty_on(input, {2}, p.acc_type);  // the mean's divisors (rules.h: Divisors)
    if (view.rows.chunks > 1) partial = empty_on(input, {p.rows * view.rows.chunks * cuda::kPartialValues}, p.acc_type);
    const int64_t parts = cuda::reduce_parts(p.rows);
    if (parts > 1) reduce_partial = empty_on(input, {cuda::kReduceSums * parts}, ScalarType::Double);
    if (reduced) {
      row_loss = empty_on(input, {p.rows}, ScalarType::Double);
      row_zloss = empty_on(input, {p.rows}, ScalarType::Double);
      out.loss = empty_on(input, {}, loss_dtype);
      out.z_loss = empty_on(input, {}, loss_dtype);
    } else {
      out.loss = empty_on(input, {p.rows}, loss_dtype);
      out.z_loss = empty_on(input, {p.rows}, loss_dtype);
    }
    cuda::ForwardArgs a{};
    a.v = view.rows;
    a.lse = lse.mutable_data_ptr<double>();
    a.row_loss = reduced ? row_loss.mutable_data_ptr<double>() : nullptr;
    a.row_zloss = reduced ? row_zloss.mutable_data_ptr<double>() : nullptr;
    a.row_weight = row_weight.mutable_data_ptr<double>();
    a.partial = view.rows.chunks > 1 ? partial.mutable_data_ptr() : nullptr;
    a.reduce_partial = parts > 1 ? reduce_partial.mutable_data_ptr<double>() : nullptr;
    a.loss_dtype = kernel_dtype(loss_dtype);
    a.loss_out = out.loss.mutable_data_ptr();
    a.zloss_out = out.z_loss.mutable_data_ptr();
    a.total_weight = out.total_weight.mutable_data_ptr();
    cuda::launch_forward(a, stream);

    if (!reduced) {
      out.loss = torch::stable::reshape(out.loss, p.row_shape);
      out.z_loss = torch::stable::reshape(out.z_loss, p.row_shape);
    }
    std::vector<int64_t> lse_shape = p.row_shape;
    if (slice) lse_shape.push_back(3);
    out.lse = torch::stable::reshape(lse, lse_shape);
    if (!compute_grad) {
      out.grad_input = empty_on(input, {0}, p.dtype);
      return out;
    }
    Tensor gx2d = empty_on(input, {p.rows, p.classes}, p.dtype);
    const Tensor lse_in = slice ? lse_pairs(lse) : lse;  // a slice's gradient against its own lse
    launch_gradient(view, p, {}, {}, values_of(out.total_weight), lse_in, gx2d, nullptr, stream);
    out.grad_input = grad_to_input_layout(gx2d, input);
    return out;
  }

  static void backward_into(const BackwardArgs& b, const Problem& p, Tensor& gx2d, Tensor* gy2d) {
    const int64_t n_grad = b.opt.reduction == kNone ? p.rows : 1;
    const Tensor gl = incoming(b.grad_loss, n_grad, "grad_loss", p.logits);
    const Tensor gz = incoming(b.grad_z_loss, n_grad, "grad_z_loss", p.logits);
    const Tensor tw = incoming(b.total_weight, 2, "total_weight", p.logits);
    Tensor lse = incoming(b.lse, p.rows * b.lse_columns, "lse", p.logits);
    if (lse.scalar_type() != ScalarType::Double) lse = torch::stable::to(lse, ScalarType::Double);
    if (b.opt.vocab_size >= 0) lse = lse_pairs(torch::stable::reshape(lse, {p.rows, b.lse_columns}));
    const cudaStream_t stream = current_stream(p.logits);
    const View view(p, b.opt, stream);
    launch_gradient(view, p, values_of(gl), values_of(gz), values_of(tw), lse, gx2d, gy2d, stream);
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastce, CUDA, m) {
  m.impl("cross_entropy_forward", &forward_kernel<Cuda>);
  m.impl("cross_entropy_backward", &backward_kernel<Cuda>);
  m.impl("cross_entropy_backward_inplace", &backward_inplace_kernel<Cuda>);
}

}  // namespace fastce
