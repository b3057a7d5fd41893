// Lanes kernels of the CPU backend: the loss and gradient of many rows at once, one row per SIMD
// lane, with a loop over the classes. They take the problems the row kernels (one row at a time,
// SIMD along its classes) handle badly:
//   - spatial problems, (N, C, d1..dk) logits in their own layout: the C values of a position are
//     `inner` elements apart, consecutive positions are adjacent; a vector holds the same class of
//     consecutive positions, and the gradient is written in that layout;
//   - rows of few classes (rows x C, C small, classes contiguous): a vector's lanes are rows,
//     gathered into a small tile (classes x lanes) and the gradient scattered back.
// The driver (lanes.cpp) cuts a problem into spans of at most kSpan rows; a kernel call takes a span.
//
// Like row_kernels.h, this header includes no torch header: the implementation
// (lanes_kernels_impl.h) is compiled once per instruction set.
#pragma once
#include <cstdint>

#include "../rules.h"

namespace fastce::cpu {

// Rows a kernel call takes at most (the driver's stack buffers hold one span's targets).
constexpr int64_t kSpan = 1024;
// Classes of a tiled row at most (the kernels' tiles hold that many; longer rows take the row kernels).
constexpr int64_t kMaxTiledClasses = 64;

// What is the same for every span of a call. Strides are in elements: between rows (positions)
// and between classes, of the logits x, probability targets y and the gradients gx, gy.
struct LanesConfig {
  Dtype dtype;
  int64_t classes;
  bool tiled;  // rows of few classes (gathered into tiles); else positions at unit stride (spatial)
  int64_t x_row, x_class, y_row, y_class, gx_row, gx_class, gy_row, gy_class;
  double logit_scale, softcap;  // as LossOptions
  const void* weight;           // class weights in the accumulation type (float or double), or nullptr
  double eps;                   // label smoothing
  double vocab;                 // the classes label smoothing spreads over
  double weight_sum;            // sum of the class weights (classes without weights)
  double lse_square_scale;
  bool prob;                    // probability targets (y); else class indices (Span::target)
};

// One span of n <= kSpan rows; every pointer is at the span's first row.
struct Span {
  const void* x;
  const void* y;       // probability targets, or nullptr
  void* gx;            // the gradient of x, or nullptr (no gradient)
  void* gy;            // the gradient of y, or nullptr
  int64_t n;
  const int32_t* target;  // class indices: n values, -1 where ignored
  double* lse;            // n values out (0 for ignored rows), or nullptr
  double* loss;           // n row losses out (the z-loss included), or nullptr
  double* z_loss;         // n row z-losses out, or nullptr
  const double* g;        // n incoming gradients of the rows' losses (divided by the mean's
  const double* g_z;      //   divisor), or nullptr: g_all, g_z_all for every row
  double g_all, g_z_all;
};

// The sums of a span's losses and z-losses (in row order within each vector, then vector by vector).
struct SpanSums {
  double loss = 0.0, z_loss = 0.0;
};

struct LanesKernels {
  const char* isa;
  SpanSums (*span)(const LanesConfig& cfg, const Span& span);
};

const LanesKernels& lanes_kernels_generic();
const LanesKernels& lanes_kernels_avx2();
const LanesKernels& lanes_kernels_avx512();
const LanesKernels& lanes_kernels_avx512bf16();

// The set compiled for the instruction set `isa` names (that of the row kernels in use).
const LanesKernels& lanes_kernels_for(const char* isa);

}  // namespace fastce::cpu
