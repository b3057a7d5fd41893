// Compiles row_kernels_impl.h for one x86-64 instruction set and defines kernels_<ISA>().
// The including file defines FASTCE_ISA (a name), FASTCE_TARGET (GCC target options),
// FASTCE_VW, FASTCE_F16C and optionally FASTCE_BF16_CVT. On other architectures
// kernels_<ISA>() returns the generic kernels.
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

#define FASTCE_STR2(x) #x
#define FASTCE_STR(x) FASTCE_STR2(x)
#define FASTCE_CAT2(a, b) a##b
#define FASTCE_CAT(a, b) FASTCE_CAT2(a, b)
#define FASTCE_ISA_NAME FASTCE_STR(FASTCE_ISA)
#define FASTCE_PRAGMA(x) _Pragma(#x)
#define FASTCE_TARGET_PRAGMA(t) FASTCE_PRAGMA(GCC target(t))

#if defined(__x86_64__)
#pragma GCC push_options
FASTCE_TARGET_PRAGMA(FASTCE_TARGET)
#include "row_kernels_impl.h"
#pragma GCC pop_options

namespace fastce::cpu {
const RowKernels& FASTCE_CAT(kernels_, FASTCE_ISA)() { return FASTCE_ISA::table(); }
}  // namespace fastce::cpu
#else
namespace fastce::cpu {
const RowKernels& FASTCE_CAT(kernels_, FASTCE_ISA)() { return kernels_generic(); }
}  // namespace fastce::cpu
#endif
