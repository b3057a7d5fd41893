// The row kernels compiled for avx2: 8 float lanes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "row_kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTCE_ISA avx2
#define FASTCE_ISA_NAME "avx2"
#define FASTCE_VW 8
#define FASTCE_F16C 1
#include "row_kernels_impl.h"
#pragma GCC pop_options

namespace fastce::cpu {
const RowKernels& kernels_avx2() { return avx2::table(); }
}  // namespace fastce::cpu
#else
namespace fastce::cpu {
const RowKernels& kernels_avx2() { return kernels_generic(); }
}  // namespace fastce::cpu
#endif
