// The row kernels for any CPU (4 float lanes: SSE2 on x86-64), the merge of piece
// statistics, and the run-time choice of instruction set.
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

#include "row_kernels.h"

#define FASTCE_ISA generic
#define FASTCE_ISA_NAME "generic"
#define FASTCE_VW 4
#define FASTCE_F16C 0
#include "row_kernels_impl.h"

namespace fastce::cpu {

const RowKernels& kernels_generic() { return generic::table(); }

void merge_stats(PieceStats& a, const PieceStats& b) {
  if (a.sumexp == 0.0 && a.max == -std::numeric_limits<double>::infinity()) {  // a is empty
    a.max = b.max;
    a.sumexp = b.sumexp;
  } else if (b.max > a.max) {
    a.sumexp = a.sumexp * std::exp(a.max - b.max) + b.sumexp;
    a.max = b.max;
  } else if (b.sumexp != 0.0) {  // an empty piece (all -inf) adds nothing
    a.sumexp += b.sumexp * std::exp(b.max - a.max);
  }
  a.sum_wz += b.sum_wz;
  a.sum_wyz += b.sum_wyz;
  a.sum_wy += b.sum_wy;
  a.has_nan = a.has_nan || b.has_nan;
}

const RowKernels* select_kernels(const char* requested) {
#if defined(__x86_64__)
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  const bool has_avx512_bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
#else
  const bool has_avx2 = false, has_avx512 = false, has_avx512_bf16 = false;
#endif
  if (requested == nullptr || *requested == '\0') {
    if (has_avx512_bf16) return &kernels_avx512bf16();
    if (has_avx512) return &kernels_avx512();
    if (has_avx2) return &kernels_avx2();
    return &kernels_generic();
  }
  const std::string name(requested);
  if (name == "generic") return &kernels_generic();
  if (name == "avx2" && has_avx2) return &kernels_avx2();
  if (name == "avx512" && has_avx512) return &kernels_avx512();
  if (name == "avx512bf16" && has_avx512_bf16) return &kernels_avx512bf16();
  return nullptr;
}

}  // namespace fastce::cpu
