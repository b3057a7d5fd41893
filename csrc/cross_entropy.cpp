#include "cross_entropy.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace fastce {

Options make_options(int64_t reduction, int64_t ignore_index, double label_smoothing,
                     double logit_scale, std::optional<double> softcap, double lse_square_scale) {
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum,
                    "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(std::isfinite(logit_scale), "logit_scale must be finite, got ", logit_scale);
  TORCH_CHECK_VALUE(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)),
                    "softcap must be a positive finite number or None, got ", softcap.value_or(0.0));
  TORCH_CHECK_VALUE(std::isfinite(lse_square_scale) && lse_square_scale >= 0.0,
                    "lse_square_scale must be a finite number >= 0, got ", lse_square_scale);
  return Options{reduction, ignore_index, label_smoothing, logit_scale, softcap.value_or(0.0),
                 lse_square_scale};
}

namespace {

void check_label_smoothing(double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
}

bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_same_device(const at::Tensor& input, const at::Tensor& other) {
  TORCH_CHECK(input.device() == other.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", other.device(), "!");
}

}  // namespace

Problem prepare(const at::Tensor& input, const at::Tensor& target,
                const std::optional<at::Tensor>& weight_opt, const Options& opt) {
  Problem p;
  const at::Tensor weight = weight_opt.has_value() ? *weight_opt : at::Tensor();
  check_same_device(input, target);
  if (weight.defined()) check_same_device(input, weight);
  TORCH_CHECK_NOT_IMPLEMENTED(supported_float(input.scalar_type()), "\"cross_entropy\" not implemented for '",
                              input.scalar_type(), "'");
  p.prob = input.sizes() == target.sizes();
  const int64_t dim = input.dim();
  // The checks follow torch's order, so that with two faults the same one is reported.
  if (p.prob) {
    TORCH_CHECK(at::isFloatingType(target.scalar_type()),
                "Expected floating point type for target with class probabilities, got ",
                target.scalar_type());
    TORCH_CHECK(opt.ignore_index < 0, "ignore_index is not supported for floating point target");
    check_label_smoothing(opt.label_smoothing);
    TORCH_CHECK_INDEX(dim >= 1, "Dimension specified as 1 but tensor has no dimensions");
  } else {
    check_label_smoothing(opt.label_smoothing);
    TORCH_CHECK_VALUE(dim >= 1, "Expected 1 or more dimensions (got ", dim, ")");
    if (dim != 1) {
      const int64_t target_batch = target.dim() == 0 ? 0 : target.size(0);
      TORCH_CHECK_VALUE(input.size(0) == target_batch, "Expected input batch_size (", input.size(0),
                        ") to match target batch_size (", target_batch, ").");
    }
    if (dim == 4) {  // torch's nll_loss2d words these its own way
      TORCH_CHECK(target.dim() == 3,
                  "only batches of spatial targets supported (3D tensors) but got targets of dimension: ",
                  target.dim());
      TORCH_CHECK(target.size(1) == input.size(2) && target.size(2) == input.size(3),
                  "size mismatch (got input: ", input.sizes(), " , target: ", target.sizes());
    } else if (dim >= 3) {
      std::vector<int64_t> expected{input.size(0)};
      for (int64_t d = 2; d < dim; ++d) expected.push_back(input.size(d));
      TORCH_CHECK(target.sizes().size() >= 1 && target.sizes().slice(1) == input.sizes().slice(2),
                  "Expected target size ", at::IntArrayRef(expected), ", got ", target.sizes());
    } else {
      TORCH_CHECK(target.dim() <= 1, "0D or 1D target tensor expected, multi-target not supported");
      if (dim == 1 && target.dim() == 1) {
        TORCH_CHECK_VALUE(target.size(0) == 1,
                          "For 1D input, 1D target must have size 1, but got target size: ",
                          target.size(0));
      }
    }
    const auto tt = target.scalar_type();
    TORCH_CHECK(tt == at::kLong || tt == at::kByte || tt == at::kInt,
                "expected target dtype to be Long or Byte, but got ", tt);
  }

  const int64_t class_dim = dim == 1 ? 0 : 1;
  p.classes = input.size(class_dim);
  if (weight.defined()) {
    const bool complete = weight.dim() == 1 && weight.numel() == p.classes;
    if (!p.prob && dim >= 3) {  // torch's nll_loss2d wording
      TORCH_CHECK(complete, "weight tensor should be defined either for all or no classes");
    } else {
      TORCH_CHECK(complete, p.prob ? "cross_entropy: " : "",
                  "weight tensor should be defined either for all ", p.classes,
                  " classes or no classes but got weight tensor of shape: ", weight.sizes());
    }
    TORCH_CHECK(p.prob || weight.scalar_type() == input.scalar_type(), "expected scalar type ",
                input.scalar_type(), " but found ", weight.scalar_type());
  }

  // Canonical layout: one row per (batch, spatial) position, classes last.
  p.row_shape.clear();
  if (dim >= 2) p.row_shape.push_back(input.size(0));
  for (int64_t d = 2; d < dim; ++d) p.row_shape.push_back(input.size(d));
  p.rows = 1;
  for (int64_t s : p.row_shape) p.rows *= s;

  // (rows, classes) input is used as it is: each view op is a dispatcher round trip,
  // which on a 64 x 10 batch costs as much as the kernel.
  at::Tensor logits = dim == 1 ? input.unsqueeze(0) : input;
  if (dim >= 3) logits = logits.movedim(1, -1).reshape({p.rows, p.classes});
  if (logits.stride(1) != 1 && p.classes > 1) logits = logits.contiguous();
  p.logits = logits;

  if (p.prob) {
    at::Tensor y = dim == 1 ? target.unsqueeze(0) : target;
    if (dim >= 3) y = y.movedim(1, -1);
    y = y.to(input.scalar_type()).reshape({p.rows, p.classes});
    if (y.stride(1) != 1 && p.classes > 1) y = y.contiguous();
    p.target = y;
  } else {
    p.target = target.dim() == 1 && target.is_contiguous() ? target : target.reshape({p.rows}).contiguous();
  }

  p.acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (weight.defined()) {
    p.weight = weight.to(p.acc_type).contiguous();
  }
  return p;
}

at::Tensor grad_to_input_layout(const at::Tensor& grad2d, const at::Tensor& input) {
  if (input.dim() == 2) return grad2d;  // already (rows, classes): no view to make
  if (input.dim() < 2) return grad2d.view(input.sizes());
  std::vector<int64_t> shape{input.size(0)};
  for (int64_t d = 2; d < input.dim(); ++d) shape.push_back(input.size(d));
  shape.push_back(input.size(1));
  return grad2d.view(shape).movedim(-1, 1).contiguous();
}

}  // namespace fastce
