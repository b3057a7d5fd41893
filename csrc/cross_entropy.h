// What every backend shares: the options of the ops, the argument checks (the one
// place where bad input is rejected, with torch's exception types and messages),
// and the canonical (rows, classes) view the kernels work on.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fastce {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

struct Options {
  int64_t reduction;
  int64_t ignore_index;
  double label_smoothing;
  double logit_scale;
  double softcap;  // 0: off
  double lse_square_scale;
};

Options make_options(int64_t reduction, int64_t ignore_index, double label_smoothing,
                     double logit_scale, std::optional<double> softcap, double lse_square_scale);

struct Problem {
  at::Tensor logits;   // (rows, classes), unit stride along classes
  at::Tensor target;   // class indices: (rows,) contiguous int64/int32/uint8;
                       // probabilities: (rows, classes) in the logits' dtype, unit class stride
  at::Tensor weight;   // (classes,) contiguous in the accumulation dtype, or undefined
  bool prob = false;
  int64_t rows = 0, classes = 0;
  std::vector<int64_t> row_shape;  // shape of the per-row loss (reduction='none')
  at::ScalarType acc_type;         // float, or double for double inputs
};

// Validates the arguments and builds the canonical view. Throws like torch does.
Problem prepare(const at::Tensor& input, const at::Tensor& target,
                const std::optional<at::Tensor>& weight, const Options& opt);

// Gives a (rows, classes) gradient the shape of `input` (contiguous).
at::Tensor grad_to_input_layout(const at::Tensor& grad2d, const at::Tensor& input);

}  // namespace fastce
