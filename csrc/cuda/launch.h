// The interface between the torch-facing CUDA driver (cross_entropy_cuda.cpp) and the
// kernel files (forward.cu, backward.cu): plain pointers and sizes, no torch types,
// so each kernel file compiles as its own unit.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastce::cuda {

enum class Dtype : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// The canonical (rows, classes) problem, as the kernels see it. "acc" is the
// accumulation type: double for Float64 inputs, float otherwise.
struct Rows {
  Dtype dtype;
  const void* x;            // logits, unit class stride
  int64_t x_stride;         // elements between rows
  const void* y;            // probability targets (dtype of x, unit class stride) or nullptr
  int64_t y_stride;
  const int64_t* target;    // class indices (rows,), or nullptr for probability targets
  const void* weight;       // (classes,) in acc, or nullptr
  const double* weight_sum; // device scalar: sum of the class weights (only read when
                            // weight != nullptr and label_smoothing > 0)
  int64_t rows, classes;
  int64_t ignore_index;
  double label_smoothing, logit_scale, softcap, lse_square_scale;  // softcap 0: off
  // Rows are cut into `chunks` pieces of `chunk` classes (the last one shorter) when
  // there are too few rows to fill the GPU; see plan_chunks().
  int64_t chunk, chunks;
};

// How many pieces to cut each row into, so that few-row, huge-vocabulary problems
// still put enough warps on every SM. Returns the piece length (classes); the
// caller derives the number of pieces.
int64_t plan_chunk(int64_t rows, int64_t classes, Dtype dtype, int sm_count);

// Forward: per-row lse / loss / z-loss / weight, then the fixed-order reduction.
struct ForwardArgs {
  Rows v;
  int64_t reduction;    // 0 none, 1 mean, 2 sum
  void* lse;            // (rows,) double
  void* row_loss;       // (rows,) acc: per-row loss (the 'none' result before the dtype cast)
  void* row_zloss;      // (rows,) acc
  void* row_weight;     // (rows,) acc: weight of each row's loss (0 when ignored)
  void* partial;        // (rows * chunks * 5) acc scratch, when chunks > 1
  void* loss_out;       // 0-d, input dtype (mean/sum only)
  void* zloss_out;      // 0-d, input dtype (mean/sum only)
  void* total_weight;   // 0-d acc: the mean's divisor
};
void launch_forward(const ForwardArgs& a, cudaStream_t stream);

// Sum of n acc-typed values into *out (double), one block, fixed order.
void launch_weight_sum(Dtype dtype, const void* w, int64_t n, double* out, cudaStream_t stream);

struct BackwardArgs {
  Rows v;
  int64_t reduction;
  const void* grad_loss;      // acc, (rows,) when reduction is none, else (1,)
  const void* grad_zloss;     // acc, same shape
  const void* lse;            // (rows,) double
  const void* total_weight;   // (1,) acc
  void* sum_wy;               // (rows,) acc scratch for probability targets
  void* others;               // (rows * chunks) acc scratch for class-index targets: sum of
                              // p_c over each piece's classes other than the target
  void* x_target;             // (rows,) acc scratch: the target's logit, saved before in-place writes
  void* lse_parts;            // (rows, 2) acc scratch: each row's lse as shift + rel (see kHugeLse)
  void* gx;                   // (rows, classes) in dtype, unit class stride; may alias x
  int64_t gx_stride;
  void* gy;                   // gradient of probability targets, or nullptr
  int64_t gy_stride;
};
void launch_backward(const BackwardArgs& a, cudaStream_t stream);

}  // namespace fastce::cuda
