// The interface between the torch-facing CUDA driver (cross_entropy_cuda.cpp) and the kernel
// files (forward.cu, backward.cu): plain pointers and sizes, no torch types, so each kernel file
// compiles as its own unit (and, for tests/cuda_emulation, with g++ on the host).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../rules.h"

namespace fastce::cuda {

// The canonical (rows, classes) problem, as the kernels see it. "acc" is the accumulation
// type: double for Float64 inputs, float otherwise.
struct Rows {
  Dtype dtype;
  const void* x;             // logits, unit class stride
  int64_t x_stride;          // elements between rows
  const void* y;             // probability targets (dtype of x, unit class stride) or nullptr
  int64_t y_stride;
  const int64_t* target;     // class indices (rows,), global (see LossOptions), or nullptr
  const void* weight;        // (classes,) in acc, or nullptr
  const double* weight_sum;  // device scalar: sum of the class weights (only read when
                             // weight != nullptr and label_smoothing > 0)
  int64_t rows, classes;
  LossOptions opt;
  // Rows are cut into `chunks` pieces of `chunk` classes (the last one shorter) when there are
  // too few rows to fill the GPU; see plan_chunk().
  int64_t chunk, chunks;
};

// How many pieces to cut each row into, so that few-row, huge-vocabulary problems still put
// enough warps on every SM. Returns the piece length (classes); the caller derives the number
// of pieces.
int64_t plan_chunk(int64_t rows, int64_t classes, Dtype dtype, int sm_count);

// Forward: per-row lse / loss / z-loss / weight, then the fixed-order reduction.
constexpr int kPartialValues = 6;  // acc values of a piece's statistics (forward.cu: Stats)
struct ForwardArgs {
  Rows v;
  double* lse;            // (rows,); (rows, 3) for a vocabulary slice: rules.h's SliceLse
  double* row_loss;       // (rows,) 'mean'/'sum': each row's loss (z-loss included; 0 when ignored)
  double* row_zloss;      // (rows,) 'mean'/'sum': each row's z-loss
  double* row_weight;     // (rows,) the weight of each row's loss (0 when ignored)
  void* partial;          // (rows * chunks * kPartialValues) acc scratch, when chunks > 1
  double* reduce_partial; // (kReduceSums * reduce_parts(rows)) scratch, when reduce_parts(rows) > 1
  Dtype loss_dtype;
  void* loss_out;         // of loss_dtype: 0-d ('mean'/'sum'), or (rows,) ('none': written per row)
  void* zloss_out;        // the same for the z-loss
  void* total_weight;     // (2,) acc: the mean's divisors (rules.h: Divisors)
};

// The reduction over rows: one block of reduce_kernel up to kReduceRowsPerBlock rows; beyond,
// a first stage of reduce_parts(rows) blocks over fixed ranges of rows (deterministic: the
// ranges depend on the row count only), then one block over their sums.
#ifndef FASTCE_REDUCE_ROWS_PER_BLOCK  // (the emulation lowers it: two stages on few rows)
#define FASTCE_REDUCE_ROWS_PER_BLOCK 4096
#endif
constexpr int64_t kReduceRowsPerBlock = FASTCE_REDUCE_ROWS_PER_BLOCK;
constexpr int kReduceSums = 4;  // losses, z-losses, weights, non-ignored rows
inline int64_t reduce_parts(int64_t rows) {
  return rows <= kReduceRowsPerBlock ? 1 : (rows + kReduceRowsPerBlock - 1) / kReduceRowsPerBlock;
}
void launch_forward(const ForwardArgs& a, cudaStream_t stream);

// Sum of n acc-typed values into *out (double), one block, fixed order.
void launch_weight_sum(Dtype dtype, const void* w, int64_t n, double* out, cudaStream_t stream);

// Values of any floating dtype, read as double (as the CPU backend reads its incoming
// gradients and total weight). data == nullptr: absent (see BackwardArgs).
struct Values {
  const void* data;
  Dtype dtype;
};

struct BackwardArgs {
  Rows v;
  Values grad_loss;     // (rows,) when reduction is none, else (1,); absent: 1 (unit gradient)
  Values grad_zloss;    // same shape; absent: 0
  Values total_weight;  // (2,): the mean's divisors
  const double* lse;    // (rows,); (rows, 2) for a vocabulary slice: (shift, rel) of the whole's
  double* sum_wy;       // (rows,) scratch, split rows with probability targets: sum_c w_c y_c
  RowLse* huge_lse;     // (rows,) scratch, split rows (not of a vocabulary slice, which keeps
                        // the lse it is given): huge rows' lse recomputed from the logits
  void* gx;             // (rows, classes) in dtype, unit class stride; may alias x
  int64_t gx_stride;
  void* gy;             // gradient of probability targets, or nullptr
  int64_t gy_stride;
};
void launch_backward(const BackwardArgs& a, cudaStream_t stream);

}  // namespace fastce::cuda
