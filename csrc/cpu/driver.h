// What every CPU driver shares: the choice of row kernels, and the split of a
// (rows, classes) problem into fixed-size (row, piece) tasks for at::parallel_for.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>

#include "row_kernels.h"

namespace fastce::cpu {

// Elements of one row that one task handles. Fixed (not derived from the thread
// count) so that the order of every floating-point sum is fixed.
constexpr int64_t kPiece = 32768;
// Work (elements) below which a parallel chunk is not worth a thread.
constexpr int64_t kMinChunk = 16384;

// The best kernels for this CPU, or those FASTCE_CPU_ISA names.
inline const RowKernels& kernels() {
  const char* requested = std::getenv("FASTCE_CPU_ISA");
  const RowKernels* k = select_kernels(requested);
  TORCH_CHECK(k != nullptr, "FASTCE_CPU_ISA=", requested,
              " is not one of 'generic', 'avx2', 'avx512', 'avx512bf16' supported by this CPU");
  return *k;
}

inline Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return Dtype::Float64;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Float16;
    default: return Dtype::Float32;
  }
}

inline int64_t pieces_per_row(int64_t classes) {
  return std::max<int64_t>(1, (classes + kPiece - 1) / kPiece);
}

// Runs f(task, row, begin, end) over every (row, piece) task, in parallel. Rows longer
// than kPiece are split so that few-row problems use every core. Rows of 0 classes have
// no task (their buffers have no data; callers keep default statistics for them), so
// every task has begin < end.
template <class F>
void for_each_piece(int64_t rows, int64_t classes, F&& f) {
  if (classes == 0) return;
  const int64_t np = pieces_per_row(classes);
  const int64_t grain = std::max<int64_t>(1, kMinChunk / std::max<int64_t>(1, std::min(classes, kPiece)));
  at::parallel_for(0, rows * np, grain, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / np, begin = (task % np) * kPiece;
      f(task, r, begin, std::min(classes, begin + kPiece));
    }
  });
}

}  // namespace fastce::cpu
