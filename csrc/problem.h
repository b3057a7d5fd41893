// What every backend shares: the options as the ops receive them, the argument checks (the
// one place where bad input is rejected, with torch's exception types and messages), and
// the canonical (rows, classes) view the kernels work on.
#pragma once
#include <optional>
#include <vector>

#include "torch_api.h"

namespace fastce {

// The options of a boxed call, read after its tensors, and validated.
LossOptions read_options(Args& args);

struct Problem {
  Tensor logits;   // (rows, classes), unit stride along classes; spatial: (N, classes, inner)
  Tensor target;   // class indices: (rows,) contiguous int64/int32/uint8;
                   // probabilities: (rows, classes) in the logits' dtype, unit class stride;
                   // spatial: (N, classes, inner) like the logits
  // Spatial: (N, C, d1..dk) logits kept in their own layout (see prepare's spatial_min_inner):
  // logits and probability targets are (N, C, inner = d1*..*dk) views with unit inner stride,
  // row n * inner + i being position i of sample n.
  bool spatial = false;
  int64_t inner = 1;
  std::optional<Tensor> weight;  // (classes,) contiguous in the accumulation dtype
  bool prob = false;
  int64_t rows = 0, classes = 0;
  std::vector<int64_t> row_shape;  // shape of the per-row loss (reduction='none')
  ScalarType dtype;                // the logits'
  ScalarType acc_type;             // float, or double for double inputs
};

// Validates the arguments and builds the canonical view. Throws like torch does.
// spatial_min_inner > 0 (a backend with spatial kernels): (N, C, d1..dk) logits whose classes are
// not contiguous and whose positions are (inner >= spatial_min_inner positions at unit stride)
// are kept in their own layout (Problem::spatial) rather than copied into rows.
Problem prepare(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                const LossOptions& opt, int64_t spatial_min_inner = 0);

// Gives a gradient the shape of `input`: one already of that shape as it is; a (rows, classes)
// one as a view in the input's layout when the input's classes are its innermost dimension
// (channels_last), else as a contiguous tensor.
Tensor grad_to_input_layout(const Tensor& grad2d, const Tensor& input);

}  // namespace fastce
