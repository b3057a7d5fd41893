// The lanes kernels for any CPU (4 float lanes: SSE2 on x86-64), and the choice of the set that
// matches the row kernels' instruction set.
// (GCC notes that passing 64-byte vectors by value changed ABI in GCC 4.6: nothing crosses a library boundary.)
#pragma GCC diagnostic ignored "-Wpsabi"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "lanes_kernels.h"
#include "row_kernels.h"

#define FASTCE_ISA generic
#define FASTCE_ISA_NAME "generic"
#define FASTCE_VW 4
#define FASTCE_F16C 0
#include "simd_impl.h"
#include "lanes_kernels_impl.h"

namespace fastce::cpu {

const LanesKernels& lanes_kernels_generic() { return generic::lanes_table(); }

const LanesKernels& lanes_kernels_for(const char* isa) {
  const std::string name(isa);
  if (name == "avx512bf16") return lanes_kernels_avx512bf16();
  if (name == "avx512") return lanes_kernels_avx512();
  if (name == "avx2") return lanes_kernels_avx2();
  return lanes_kernels_generic();
}

}  // namespace fastce::cpu
