// The CPU driver of the lanes kernels (lanes_kernels.h): spatial problems and rows of few classes.
//
// The choice of path, from the shape and strides alone (cross_entropy_cpu.cpp asks takes_lanes):
//   - (N, C, d1..dk) logits whose classes are not their innermost dimension and whose
//     inner = d1*..*dk positions lie at unit stride, with inner >= kSpatialMinInner: spatial
//     (prepare keeps them in their own layout, Problem::spatial; no copy). Fewer positions, or
//     positions that are not contiguous (a strided view): prepare copies them into rows.
//   - rows (2-D logits, 1-D, K-dim logits whose classes are innermost: channels_last, and the
//     copies above) of at most kFewClasses classes: tiled rows.
//   - everything else, and every slice of a vocabulary (vocab_size; its lse is the whole
//     vocabulary's, which the lanes kernels do not take): the row kernels.
// The lanes path keeps O(1) state per row besides the op's outputs: targets are read per span,
// losses summed per span, and the backward recomputes each row's lse from its logits (in the
// vector registers) rather than reading the saved one.
#pragma once
#include "../op_kernels.h"
#include "lanes_kernels.h"

namespace fastce::cpu {

// Positions of a spatial problem at least (one vector of the widest instruction set).
constexpr int64_t kSpatialMinInner = 16;
// Classes of a tiled row at most: the row kernels are faster from about there on.
constexpr int64_t kFewClasses = kMaxTiledClasses;

bool takes_lanes(const Problem& p, const LossOptions& opt);

// The forward op on the lanes path; gx: the gradient's buffer when compute_grad, else nullptr.
ForwardResult lanes_forward(const Tensor& input, const Problem& p, const LossOptions& opt, Tensor* gx,
                            ScalarType loss_dtype);

// The backward op on the lanes path, into gx (and gy: probability targets' gradient, or nullptr).
void lanes_backward(const BackwardArgs& b, const Problem& p, Tensor& gx, Tensor* gy);

}  // namespace fastce::cpu
