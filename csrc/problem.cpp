#include "problem.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace fastce {

LossOptions read_options(Args& args) {
  LossOptions o;
  o.reduction = args.integer();
  o.ignore_index = args.integer();
  o.label_smoothing = args.real();
  o.logit_scale = args.real();
  const std::optional<double> softcap = args.optional_real();
  o.lse_square_scale = args.real();
  o.class_offset = args.integer();
  o.vocab_size = args.integer();
  FASTCE_CHECK_VALUE(o.reduction >= kNone && o.reduction <= kSum,
                     "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", o.reduction);
  FASTCE_CHECK_VALUE(std::isfinite(o.logit_scale), "logit_scale must be finite, got ", o.logit_scale);
  FASTCE_CHECK_VALUE(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)),
                     "softcap must be a positive finite number or None, got ", softcap.value_or(0.0));
  FASTCE_CHECK_VALUE(std::isfinite(o.lse_square_scale) && o.lse_square_scale >= 0.0,
                     "lse_square_scale must be a finite number >= 0, got ", o.lse_square_scale);
  FASTCE_CHECK_VALUE(o.class_offset >= 0, "class_offset must be >= 0, got ", o.class_offset);
  o.softcap = softcap.value_or(0.0);
  return o;
}

namespace {

void check_label_smoothing(double label_smoothing) {
  FASTCE_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
               "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
}

void check_same_device(const Tensor& input, const Tensor& other) {
  FASTCE_CHECK(input.device() == other.device(),
               "Expected all tensors to be on the same device, but found at least two devices, ",
               device_name(input), " and ", device_name(other), "!");
}

std::vector<int64_t> tail(IntArrayRef shape, size_t from) {
  return std::vector<int64_t>(shape.begin() + std::min(from, shape.size()), shape.end());
}

// torch's checks of class-index targets, in torch's order (with two faults, the same one is
// reported).
void check_class_target(const Tensor& input, const Tensor& target) {
  const int64_t dim = input.dim();
  FASTCE_CHECK_VALUE(dim >= 1, "Expected 1 or more dimensions (got ", dim, ")");
  if (dim != 1) {
    const int64_t target_batch = target.dim() == 0 ? 0 : target.size(0);
    FASTCE_CHECK_VALUE(input.size(0) == target_batch, "Expected input batch_size (", input.size(0),
                       ") to match target batch_size (", target_batch, ").");
  }
  if (dim == 4) {  // torch's nll_loss2d words these its own way
    FASTCE_CHECK(target.dim() == 3,
                 "only batches of spatial targets supported (3D tensors) but got targets of dimension: ",
                 target.dim());
    FASTCE_CHECK(target.size(1) == input.size(2) && target.size(2) == input.size(3),
                 "size mismatch (got input: ", input.sizes(), " , target: ", target.sizes());
  } else if (dim >= 3) {
    std::vector<int64_t> expected{input.size(0)};
    for (int64_t d = 2; d < dim; ++d) expected.push_back(input.size(d));
    FASTCE_CHECK(target.dim() >= 1 && tail(target.sizes(), 1) == tail(input.sizes(), 2),
                 "Expected target size ", expected, ", got ", target.sizes());
  } else {
    FASTCE_CHECK(target.dim() <= 1, "0D or 1D target tensor expected, multi-target not supported");
    if (dim == 1 && target.dim() == 1) {
      FASTCE_CHECK_VALUE(target.size(0) == 1,
                         "For 1D input, 1D target must have size 1, but got target size: ", target.size(0));
    }
  }
  const ScalarType tt = target.scalar_type();
  FASTCE_CHECK(tt == ScalarType::Long || tt == ScalarType::Byte || tt == ScalarType::Int,
               "expected target dtype to be Long or Byte, but got ", tt);
}

void check_weight(const Tensor& input, const Tensor& weight, bool prob, int64_t classes) {
  const bool complete = weight.dim() == 1 && weight.numel() == classes;
  if (!prob && input.dim() >= 3) {  // torch's nll_loss2d wording
    FASTCE_CHECK(complete, "weight tensor should be defined either for all or no classes");
  } else {
    FASTCE_CHECK(complete, prob ? "cross_entropy: " : "", "weight tensor should be defined either for all ",
                 classes, " classes or no classes but got weight tensor of shape: ", weight.sizes());
  }
  // 16-bit logits take a class weight of any floating dtype (as Liger-Kernel): prepare() gives
  // the kernels every weight in the accumulation dtype, so a float32 weight keeps its precision.
  // Otherwise torch's rule: the logits' dtype.
  const bool low_precision = input.scalar_type() == ScalarType::BFloat16 || input.scalar_type() == ScalarType::Half;
  FASTCE_CHECK(prob || weight.scalar_type() == input.scalar_type() ||
                   (low_precision && is_floating(weight.scalar_type())),
               "expected scalar type ", input.scalar_type(), " but found ", weight.scalar_type());
}

// (N, C, d1..dk) -> (N * d1..dk, C) with unit class stride: one row per position.
Tensor rows_last(const Tensor& t, int64_t rows, int64_t classes) {
  Tensor v = t;
  if (t.dim() == 1) {
    v = torch::stable::reshape(t, {1, classes});
  } else if (t.dim() >= 3) {
    const int64_t n = t.size(0);
    v = torch::stable::transpose(torch::stable::reshape(t, {n, classes, rows / std::max<int64_t>(n, 1)}), 1, 2);
    v = torch::stable::reshape(v, {rows, classes});
  }
  if (v.stride(1) != 1 && classes > 1) v = torch::stable::contiguous(v);
  return v;
}

// Whether dimensions [from, dim) of t are laid out as a contiguous tensor's (unit innermost stride).
bool contiguous_from(const Tensor& t, int64_t from) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= from; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The (N, C, inner) view of t for a spatial problem, or nullopt where t's layout has none
// (positions not contiguous, or classes that overlap them).
std::optional<Tensor> spatial_view(const Tensor& t, int64_t classes, int64_t inner) {
  if (!contiguous_from(t, 2) || (t.stride(1) < inner && classes > 1)) return std::nullopt;
  return torch::stable::reshape(t, {t.size(0), classes, inner});
}

// Whether t's classes (dimension 1) are its innermost dimension, its positions in order after
// them: (N, d1..dk, C) contiguous, seen as (N, C, d1..dk) (channels_last).
bool classes_innermost(const Tensor& t) {
  if (t.dim() < 3 || t.stride(1) != 1) return false;
  int64_t expected = t.size(1);
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return t.size(0) == 1 || t.stride(0) == expected;
}

}  // namespace

Problem prepare(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                const LossOptions& opt, int64_t spatial_min_inner) {
  Problem p;
  check_same_device(input, target);
  if (weight.has_value()) check_same_device(input, *weight);
  p.dtype = input.scalar_type();
  FASTCE_CHECK_NOT_IMPLEMENTED(is_floating(p.dtype), "\"cross_entropy\" not implemented for '", p.dtype, "'");
  p.prob = input.sizes().equals(target.sizes());
  const int64_t dim = input.dim();
  if (p.prob) {
    FASTCE_CHECK(is_floating(target.scalar_type()),
                 "Expected floating point type for target with class probabilities, got ", target.scalar_type());
    FASTCE_CHECK(opt.ignore_index < 0, "ignore_index is not supported for floating point target");
    check_label_smoothing(opt.label_smoothing);
    FASTCE_CHECK_INDEX(dim >= 1, "Dimension specified as 1 but tensor has no dimensions");
  } else {
    check_label_smoothing(opt.label_smoothing);
    check_class_target(input, target);
  }

  p.classes = input.size(dim == 1 ? 0 : 1);
  if (weight.has_value()) check_weight(input, *weight, p.prob, p.classes);
  if (opt.vocab_size >= 0) {  // a slice of the vocabulary
    FASTCE_CHECK_VALUE(opt.class_offset + p.classes <= opt.vocab_size, "class_offset + classes (", opt.class_offset,
                       " + ", p.classes, ") must not exceed vocab_size (", opt.vocab_size, ")");
    FASTCE_CHECK_VALUE(!p.prob && !weight.has_value(),
                       "a slice of the vocabulary (vocab_size) takes class indices and no class weights");
  }

  if (dim >= 2) p.row_shape.push_back(input.size(0));
  for (int64_t d = 2; d < dim; ++d) p.row_shape.push_back(input.size(d));
  p.rows = 1;
  for (int64_t s : p.row_shape) p.rows *= s;

  std::optional<Tensor> spatial;
  const int64_t inner = dim >= 3 ? p.rows / std::max<int64_t>(input.size(0), 1) : 1;
  if (spatial_min_inner > 0 && dim >= 3 && p.classes > 1 && inner >= spatial_min_inner && opt.vocab_size < 0 &&
      input.stride(1) != 1)
    spatial = spatial_view(input, p.classes, inner);
  p.spatial = spatial.has_value();
  p.inner = p.spatial ? inner : 1;
  p.logits = p.spatial ? *spatial : rows_last(input, p.rows, p.classes);
  if (p.prob) {
    const Tensor y = target.scalar_type() == p.dtype ? target : torch::stable::to(target, p.dtype);
    if (p.spatial) {
      std::optional<Tensor> ys = spatial_view(y, p.classes, inner);
      p.target = ys ? *ys : *spatial_view(torch::stable::contiguous(y), p.classes, inner);
    } else {
      p.target = rows_last(y, p.rows, p.classes);
    }
  } else {
    p.target = target.dim() == 1 && target.is_contiguous()
                   ? target
                   : torch::stable::contiguous(torch::stable::reshape(target, {p.rows}));
  }
  p.acc_type = accumulation_type(p.dtype);
  if (weight.has_value()) {
    const Tensor w = weight->scalar_type() == p.acc_type ? *weight : torch::stable::to(*weight, p.acc_type);
    p.weight = w.is_contiguous() ? w : torch::stable::contiguous(w);
  }
  return p;
}

Tensor host_empty(IntArrayRef shape, ScalarType dtype) {
  // malloc and a deleter rather than aten::empty: the stable ABI reaches torch's ops through
  // the boxed dispatcher (~1.5 us a call), and a small batch's op makes five outputs.
  constexpr size_t kAlign = 64;
  int64_t numel = 1;
  std::vector<int64_t> strides(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    strides[d] = numel;
    numel *= shape[d];
  }
  const size_t bytes = (std::max<size_t>(size_t(numel) * element_size(dtype), 1) + kAlign - 1) / kAlign * kAlign;
  void* data = std::aligned_alloc(kAlign, bytes);
  FASTCE_CHECK(data != nullptr, "fastce: not enough memory: you tried to allocate ", bytes, " bytes.");
  return torch::stable::from_blob(data, shape, IntArrayRef(strides), torch::stable::Device(DeviceType::CPU), dtype,
                                  &std::free);
}

Tensor empty_on(const Tensor& like, IntArrayRef shape, ScalarType dtype) {
  return like.is_cpu() ? host_empty(shape, dtype) : torch::stable::new_empty(like, shape, dtype);
}

Tensor grad_to_input_layout(const Tensor& grad2d, const Tensor& input) {
  // already (rows, classes), or already the input's shape (spatial): no view to make
  if (input.dim() == 2 || grad2d.sizes().equals(input.sizes())) return grad2d;
  if (input.dim() < 2) return torch::stable::reshape(grad2d, input.sizes());
  const int64_t n = input.size(0), classes = input.size(1);
  if (classes_innermost(input)) {  // (N, d1..dk, C), its classes moved to dimension 1 by transposes
    std::vector<int64_t> shape{n};
    for (int64_t d = 2; d < input.dim(); ++d) shape.push_back(input.size(d));
    shape.push_back(classes);
    Tensor g = torch::stable::reshape(grad2d, shape);
    for (int64_t d = input.dim() - 1; d > 1; --d) g = torch::stable::transpose(g, d, d - 1);
    return g;
  }
  const Tensor nsc = torch::stable::reshape(grad2d, {n, grad2d.size(0) / std::max<int64_t>(n, 1), classes});
  return torch::stable::reshape(torch::stable::contiguous(torch::stable::transpose(nsc, 1, 2)), input.sizes());
}

std::vector<double> to_doubles(const Tensor& t, int64_t count, const char* what) {
  FASTCE_CHECK(t.numel() == count, what, ": expected ", count, " values, got a tensor of shape ", t.sizes());
  Tensor c = t.is_cpu() ? t : torch::stable::to(t, torch::stable::Device(DeviceType::CPU));
  if (!c.is_contiguous()) c = torch::stable::contiguous(c);
  std::vector<double> v(count);
  auto read = [&](const auto* in) {
    for (int64_t i = 0; i < count; ++i) v[i] = double(in[i]);
  };
  switch (c.scalar_type()) {
    case ScalarType::Double: read(c.const_data_ptr<double>()); break;
    case ScalarType::Float: read(c.const_data_ptr<float>()); break;
    case ScalarType::BFloat16: read(c.const_data_ptr<torch::headeronly::BFloat16>()); break;
    case ScalarType::Half: read(c.const_data_ptr<torch::headeronly::Half>()); break;
    default: read(torch::stable::to(c, ScalarType::Double).const_data_ptr<double>()); break;
  }
  return v;
}

Tensor from_doubles(const std::vector<double>& values, IntArrayRef shape, ScalarType dtype, const Tensor& like) {
  const bool on_cpu = like.is_cpu();
  Tensor out = host_empty(shape, dtype);
  const int64_t n = int64_t(values.size());
  switch (dtype) {
    case ScalarType::Double:
      if (n > 0) std::memcpy(out.mutable_data_ptr<double>(), values.data(), n * sizeof(double));
      break;
    case ScalarType::Float: {
      float* o = out.mutable_data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) o[i] = float(values[i]);
      break;
    }
    case ScalarType::BFloat16: {
      auto* o = out.mutable_data_ptr<torch::headeronly::BFloat16>();
      for (int64_t i = 0; i < n; ++i) o[i] = torch::headeronly::BFloat16(float(values[i]));
      break;
    }
    case ScalarType::Half: {
      auto* o = out.mutable_data_ptr<torch::headeronly::Half>();
      for (int64_t i = 0; i < n; ++i) o[i] = torch::headeronly::Half(float(values[i]));
      break;
    }
    default: fail(Error::Runtime, "fastce: unsupported result dtype ", dtype);
  }
  return on_cpu ? out : torch::stable::to(out, like.device());
}

}  // namespace fastce
