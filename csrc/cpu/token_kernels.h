// Row kernels of the token ops (fastce.token_logprobs, fastce.entropy): the interface between
// their driver (token_cpu.cpp) and the vector code (token_kernels_impl.h, compiled once per
// instruction set). Torch-free, like row_kernels.h, for the same reason.
#pragma once
#include <cstdint>

#include "../rules.h"

namespace fastce::cpu {

using fastce::Dtype;
using fastce::TokenOptions;
using fastce::TokenStats;

// What a row kernel needs that is the same for every row.
struct TokenRowConfig {
  Dtype dtype;
  TokenOptions opt;
  bool entropy;  // also TokenStats::sum_ed
  bool argmax;   // also TokenStats::argmax
};

// A row's incoming gradients, folded (see token_grad_shared).
struct TokenGrad {
  double lse;     // the row's log-sum-exp (of z)
  double g_sum;   // sum of the incoming gradients of its log-probs
  double g_h;     // the incoming gradient of its entropy (0: none)
  double mean_z;  // sum_c p_c z_c (when g_h != 0)
};

struct TokenKernels {
  const char* isa;
  // The statistics of x[begin, end) of one row (unit stride).
  void (*stats)(const TokenRowConfig& cfg, const void* x, int64_t begin, int64_t end, TokenStats* out);
  // z of one logit, computed exactly as the vector code computes it.
  double (*z_one)(const TokenRowConfig& cfg, const void* x, int64_t index);
  // The shared part of the gradient of x[begin, end), written in x's dtype:
  // token_grad_shared(...) * dz/dx (the one-hot part is added by add_onehot).
  void (*grad)(const TokenRowConfig& cfg, const void* x, void* gx, int64_t begin, int64_t end, const TokenGrad& g);
  // Rewrites the gradient of class `index` with its one-hot part g_onehot (the sum of the
  // incoming gradients of the log-probs of that class) added before the single rounding.
  void (*add_onehot)(const TokenRowConfig& cfg, const void* x, void* gx, int64_t index, const TokenGrad& g,
                     double g_onehot);
};

const TokenKernels& token_kernels_generic();
const TokenKernels& token_kernels_avx2();
const TokenKernels& token_kernels_avx512();

// The set for the loss kernels' instruction set of this name (row_kernels.h: RowKernels::isa).
const TokenKernels& token_kernels_for(const char* loss_isa);

}  // namespace fastce::cpu
