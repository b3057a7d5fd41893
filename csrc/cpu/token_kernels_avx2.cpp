// The token ops' row kernels compiled for AVX2: 8 float lanes.
// rules.h's token_grad_shared is instantiated here with vector lanes; being internal and
// inlined into these kernels, its vector return never crosses a call (GCC warns regardless).
#pragma GCC diagnostic ignored "-Wpsabi"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "token_kernels.h"

#define FASTCE_TOKEN_ISA token_avx2
#define FASTCE_TOKEN_ISA_NAME "avx2"
#define FASTCE_VW 8

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "token_kernels_impl.h"
#pragma GCC pop_options

namespace fastce::cpu {
const TokenKernels& token_kernels_avx2() { return token_avx2::table(); }
}  // namespace fastce::cpu
#else
namespace fastce::cpu {
const TokenKernels& token_kernels_avx2() { return token_kernels_generic(); }
}  // namespace fastce::cpu
#endif
