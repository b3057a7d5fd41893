// The interface between the token ops' CUDA driver (token_cuda.cpp) and their kernels
// (token.cu): plain pointers and sizes, no torch types (token.cu also compiles with g++ under
// tests/cuda_emulation).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../rules.h"

namespace fastce::cuda {

// Leading dimensions of the logits the kernels address directly (more are made contiguous).
constexpr int kTokenMaxLead = 6;

// logits (*, V) with unit class stride and any strides of *, and K class indices per row.
struct TokenRows {
  Dtype dtype;
  const void* x;
  int lead;                         // dims of *
  int64_t sizes[kTokenMaxLead];     // of *
  int64_t strides[kTokenMaxLead];   // elements
  int64_t rows, classes, K;
  const int64_t* index;             // (rows, K) contiguous
  TokenOptions opt;
};

struct TokenForwardArgs {
  TokenRows v;
  void* logprobs;  // (rows, K) acc
  void* entropy;   // (rows,) acc, or nullptr
  double* lse;     // (rows,)
  int64_t* argmax; // (rows,), or nullptr
};
void launch_token_forward(const TokenForwardArgs& a, cudaStream_t stream);

struct TokenBackwardArgs {
  TokenRows v;
  const double* grad_logprobs;  // (rows, K), or nullptr
  const double* grad_entropy;   // (rows,), or nullptr
  const double* lse;            // (rows,)
  const double* entropy;        // (rows,) when grad_entropy
  void* gx;                     // (rows, classes) contiguous, in dtype
};
void launch_token_backward(const TokenBackwardArgs& a, cudaStream_t stream);

}  // namespace fastce::cuda
