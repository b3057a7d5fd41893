// Compiles lanes_kernels_impl.h for one x86-64 instruction set and defines
// lanes_kernels_<ISA>(), as row_kernels_x86.h does for the row kernels (the including file
// defines the same macros). On other architectures lanes_kernels_<ISA>() returns the generic kernels.
// (GCC notes that passing 64-byte vectors by value changed ABI in GCC 4.6: nothing crosses a library boundary.)
#pragma GCC diagnostic ignored "-Wpsabi"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "lanes_kernels.h"
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
#include "simd_impl.h"
#include "lanes_kernels_impl.h"
#pragma GCC pop_options

namespace fastce::cpu {
const LanesKernels& FASTCE_CAT(lanes_kernels_, FASTCE_ISA)() { return FASTCE_ISA::lanes_table(); }
}  // namespace fastce::cpu
#else
namespace fastce::cpu {
const LanesKernels& FASTCE_CAT(lanes_kernels_, FASTCE_ISA)() { return lanes_kernels_generic(); }
}  // namespace fastce::cpu
#endif
