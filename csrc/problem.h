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
  Tensor logits;   // (rows, classes), unit stride along classes
  Tensor target;   // class indices: (rows,) contiguous int64/int32/uint8;
                   // probabilities: (rows, classes) in the logits' dtype, unit class stride
  std::optional<Tensor> weight;  // (classes,) contiguous in the accumulation dtype
  bool prob = false;
  int64_t rows = 0, classes = 0;
  std::vector<int64_t> row_shape;  // shape of the per-row loss (reduction='none')
  ScalarType dtype;                // the logits'
  ScalarType acc_type;             // float, or double for double inputs
};

// Validates the arguments and builds the canonical view. Throws like torch does.
Problem prepare(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                const LossOptions& opt);

// Gives a (rows, classes) gradient the shape and layout of `input` (contiguous).
Tensor grad_to_input_layout(const Tensor& grad2d, const Tensor& input);

}  // namespace fastce
