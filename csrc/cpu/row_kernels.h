// Row kernels of the CPU backend: the interface between the torch-facing driver
// (cross_entropy_cpu.cpp) and the SIMD implementations (row_kernels_impl.h).
//
// This header deliberately includes no torch header: the implementation is
// compiled once per instruction set with different target options, and any
// inline function shared with the rest of the library would risk the linker
// picking an AVX-512 copy for a machine without it (rules.h has internal linkage).
#pragma once
#include <cstdint>

#include "../rules.h"

namespace fastce::cpu {

using fastce::Dtype;
using fastce::GradCoef;

// Everything a row kernel needs that is the same for every row.
struct RowConfig {
  Dtype dtype;
  int64_t num_classes;
  double logit_scale;       // z = logit_scale * x ...
  double softcap;           // ... then z = softcap * tanh(z / softcap); 0 disables
  const void* weight;       // class weights in the accumulation type (float or double), or nullptr
  double prob_smoothing;    // probability targets: y2 = (1 - eps) y + eps / C is used in place of y
  bool need_sum_z;          // compute PieceStats::sum_wz (label smoothing of class-index targets)
};

// Statistics of one contiguous piece of a row; pieces merge left to right,
// so the result does not depend on how many threads computed them.
struct PieceStats {
  double max = -__builtin_inf();  // max of z over the piece (a NaN may or may not be taken: sumexp is NaN then)
  double sumexp = 0.0;            // sum of exp(z - max)
  double sum_wz = 0.0;            // sum of w_c * z_c (w_c = 1 without weights), if need_sum_z
  double sum_wyz = 0.0;           // probability targets: sum of w_c * y2_c * z_c (y2: smoothed y)
  double sum_wy = 0.0;            // probability targets: sum of w_c * y2_c
  bool has_nan = false;
};

// One implementation per instruction set, chosen at run time.
struct RowKernels {
  const char* isa;
  // Stats of x[begin, end) of one row; y (probability targets, same dtype as x) may be null.
  void (*piece_stats)(const RowConfig& cfg, const void* x, const void* y, int64_t begin, int64_t end,
                      PieceStats* out);
  // Gradient of x[begin, end) (and of y when gy is not null), written in the input's dtype.
  void (*piece_grad)(const RowConfig& cfg, const void* x, const void* y, void* gx, void* gy,
                     int64_t begin, int64_t end, const GradCoef& coef);
  // z of a single logit (the target's), computed exactly as the vector code does.
  double (*transform_one)(const RowConfig& cfg, const void* x, int64_t index);
  // Probability targets: sum of w_c * y_c over y[begin, end).
  double (*sum_wy)(const RowConfig& cfg, const void* y, int64_t begin, int64_t end);
};

const RowKernels& kernels_generic();
const RowKernels& kernels_avx2();
const RowKernels& kernels_avx512();
const RowKernels& kernels_avx512bf16();

// Chooses the best set this CPU supports, or the one named by FASTCE_CPU_ISA
// (generic, avx2, avx512, avx512bf16). Returns nullptr for an unknown or unsupported name.
const RowKernels* select_kernels(const char* requested);

// Merges b into a (b follows a in the row).
void merge_stats(PieceStats& a, const PieceStats& b);

}  // namespace fastce::cpu
