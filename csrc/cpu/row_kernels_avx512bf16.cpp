// The row kernels compiled for avx512 with AVX512-BF16: as avx512, but bfloat16
// gradients are rounded by vcvtneps2bf16 (one instruction instead of eight).
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
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")
#define FASTCE_ISA avx512bf16
#define FASTCE_ISA_NAME "avx512bf16"
#define FASTCE_VW 16
#define FASTCE_F16C 1
#define FASTCE_BF16_CVT 1
#include "row_kernels_impl.h"
#pragma GCC pop_options

namespace fastce::cpu {
const RowKernels& kernels_avx512bf16() { return avx512bf16::table(); }
}  // namespace fastce::cpu
#else
namespace fastce::cpu {
const RowKernels& kernels_avx512bf16() { return kernels_generic(); }
}  // namespace fastce::cpu
#endif
