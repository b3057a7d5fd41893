// What the backends of the token ops share (csrc/cpu/token_cpu.cpp, csrc/cuda/token_cuda.cpp):
// their options as the ops receive them, and the argument checks, in one place.
#pragma once
#include <vector>

#include "torch_api.h"

namespace fastce {

// The token options of a boxed call (csrc/ops.cpp: kTokenOptionsSchema), validated.
TokenOptions read_token_options(Args& args);

// logits (*, V) and index (*) or (*, K), checked (devices, dtypes, shapes).
struct TokenShape {
  std::vector<int64_t> row_shape;    // *
  std::vector<int64_t> index_shape;  // * or (*, K)
  int64_t rows = 0, classes = 0, K = 0;
  ScalarType dtype, acc_type;        // the logits', and float (double for double logits)
};
TokenShape check_token_args(const Tensor& logits, const Tensor& index);

}  // namespace fastce
