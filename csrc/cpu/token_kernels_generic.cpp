// The token ops' row kernels for any CPU (4 float lanes: SSE2 on x86-64), and the run-time
// choice among the sets (the same one as the loss kernels').
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "token_kernels.h"

#define FASTCE_TOKEN_ISA token_generic
#define FASTCE_TOKEN_ISA_NAME "generic"
#define FASTCE_VW 4
#include "token_kernels_impl.h"

namespace fastce::cpu {

const TokenKernels& token_kernels_generic() { return token_generic::table(); }

const TokenKernels& token_kernels_for(const char* loss_isa) {
  const std::string isa = loss_isa;
  if (isa == "avx512" || isa == "avx512bf16") return token_kernels_avx512();
  if (isa == "avx2") return token_kernels_avx2();
  return token_kernels_generic();
}

}  // namespace fastce::cpu
