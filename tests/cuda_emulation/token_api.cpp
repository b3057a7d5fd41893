// C entry points over the emulated token kernels (csrc/cuda/token.cu, rewritten by
// test_token_emulation.py): the arguments the CUDA driver (csrc/cuda/token_cuda.cpp) passes them.
#include <atomic>
#include <cstdio>
std::atomic<int> emu_asserts{0};
void emu_assert_fail(const char* what) { if (emu_asserts++ == 0) std::fprintf(stderr, "device assert: %s\n", what); }
#include "token_emu.inc"

using namespace fastce;
using namespace fastce::cuda;

// A logits tensor (*, V) of unit class stride: dims of * with their strides (elements).
struct EmuTokens {
  int dtype;
  const void* x;
  int lead;
  int64_t sizes[kTokenMaxLead];
  int64_t strides[kTokenMaxLead];
  int64_t rows, classes, K;
  const int64_t* index;
};

static TokenRows make_rows(const EmuTokens& p, double temperature, double logit_scale, double softcap) {
  TokenRows v{};
  v.dtype = Dtype(p.dtype);
  v.x = p.x;
  v.lead = p.lead;
  for (int d = 0; d < p.lead; ++d) {
    v.sizes[d] = p.sizes[d];
    v.strides[d] = p.strides[d];
  }
  v.rows = p.rows; v.classes = p.classes; v.K = p.K; v.index = p.index;
  v.opt = TokenOptions{temperature, logit_scale, softcap};
  return v;
}

// Returns 0, or -1 when a device assert failed.
extern "C" int emu_token_forward(const EmuTokens* p, double temperature, double logit_scale, double softcap,
                                 void* logprobs, void* entropy, double* lse, int64_t* argmax) {
  emu_asserts = 0;
  TokenForwardArgs a{make_rows(*p, temperature, logit_scale, softcap), logprobs, entropy, lse, argmax};
  launch_token_forward(a, nullptr);
  return emu_asserts.load() ? -1 : 0;
}

extern "C" int emu_token_backward(const EmuTokens* p, double temperature, double logit_scale, double softcap,
                                  const double* grad_logprobs, const double* grad_entropy, const double* lse,
                                  const double* entropy, void* gx) {
  emu_asserts = 0;
  TokenBackwardArgs a{make_rows(*p, temperature, logit_scale, softcap), grad_logprobs, grad_entropy, lse, entropy,
                      gx};
  launch_token_backward(a, nullptr);
  return emu_asserts.load() ? -1 : 0;
}
