// What every CPU driver shares: the choice of row kernels, and the split of a
// (rows, classes) problem into fixed-size (row, piece) tasks run in parallel.
#pragma once
#include <algorithm>
#include <cstdlib>

#include "../torch_api.h"
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
  FASTCE_CHECK(k != nullptr, "FASTCE_CPU_ISA=", requested,
               " is not one of 'generic', 'avx2', 'avx512', 'avx512bf16' supported by this CPU");
  return *k;
}

inline int64_t pieces_per_row(int64_t classes) {
  return std::max<int64_t>(1, (classes + kPiece - 1) / kPiece);
}

// f(b, e) over [0, n) in parallel chunks of at least `grain`; a single chunk runs here
// (a small batch pays no thread hand-off).
template <class F>
void parallel_rows(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  if (n <= grain || torch::stable::get_num_threads() <= 1) return f(int64_t(0), n);
  torch::stable::parallel_for(0, n, grain, f);
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
  parallel_rows(rows * np, grain, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / np, begin = (task % np) * kPiece;
      f(task, r, begin, std::min(classes, begin + kPiece));
    }
  });
}

}  // namespace fastce::cpu
