// The numerical rules of the loss, written once for every path: the CPU driver, the CUDA
// kernels, the fused linear loss and the vocabulary-parallel loss (both run the same ops).
//
// Torch-free and compiled for host and device. Every function has internal linkage: the CPU
// kernels are compiled once per instruction set, and an inline function with external
// linkage would let the linker keep, say, its AVX-512 copy for every caller.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTCE_RULE static __host__ __device__ __forceinline__
#else
// Always inlined: the CPU kernels call the rules' vector forms (V = a GCC vector) from code
// compiled for another instruction set than the rules' own definitions (no target options), and
// a call that passed a 64-byte vector across that boundary would disagree on the ABI (-O0).
#define FASTCE_RULE static inline __attribute__((always_inline))
#endif

namespace fastce {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// The element types of logits the kernels read (the accumulation type is float, double for
// Float64).
enum class Dtype : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// The options every op takes after its tensors, in the schemas' order (csrc/ops.cpp:
// kOptionsSchema; python/fastce/_ops.py: LossOptions).
struct LossOptions {
  int64_t reduction = kMean;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double logit_scale = 1.0;
  double softcap = 0.0;  // 0: off
  double lse_square_scale = 0.0;
  // Vocabulary-parallel: the input holds classes [class_offset, class_offset + C) of a
  // vocabulary of vocab_size classes (-1: the input's own C). Targets are global indices; a
  // target outside this slice contributes no target term here.
  int64_t class_offset = 0;
  int64_t vocab_size = -1;
};

// The vocabulary size that label smoothing spreads over.
FASTCE_RULE int64_t vocabulary(const LossOptions& o, int64_t classes) {
  return o.vocab_size >= 0 ? o.vocab_size : classes;
}

// ---- the logit transform ------------------------------------------------------------------
// z = logit_scale * x, then soft-capped: z = softcap * tanh(z / softcap), folded as
// tanh(x * (logit_scale / softcap)) * softcap. slope = dz/dx.
// (Member functions would have external linkage: the rules are free functions.)
template <class A>
struct LogitTransform {
  A scale, cap, u_coef;
};
template <class A>
FASTCE_RULE LogitTransform<A> logit_transform(const LossOptions& o) {
  return {A(o.logit_scale), A(o.softcap), o.softcap > 0 ? A(o.logit_scale / o.softcap) : A(0)};
}
// Its two forms, for kernels compiled once per form (transform_z picks one at run time).
template <class A>
FASTCE_RULE A scaled_z(const LogitTransform<A>& t, A x) {
  return x * t.scale;
}
template <class A>
FASTCE_RULE A capped_z(const LogitTransform<A>& t, A x) {
  return std::tanh(x * t.u_coef) * t.cap;
}
template <class A>
FASTCE_RULE A transform_z(const LogitTransform<A>& t, A x) {
  return t.cap > A(0) ? capped_z(t, x) : scaled_z(t, x);
}
// z and slope = dz/dx of the capped form from one tanh: slope = (1 - tanh^2) * logit_scale.
template <class A>
FASTCE_RULE A capped_z_slope(const LogitTransform<A>& t, A x, A& slope) {
  const A u = std::tanh(x * t.u_coef);
  slope = (A(1) - u * u) * t.scale;
  return u * t.cap;
}

// ---- a row's log-sum-exp ------------------------------------------------------------------
// A row's lse is kept as shift + rel. In one float64, max + log(sum) loses log(sum) where
// |lse| is huge (a row masked with finfo.min, ties at 1e30): from 2^19 float64's spacing
// (2^-33) shows in float64 rows' results. Such a row keeps shift = max, rel = log(sum)
// (its backward recomputes them from the logits); every other row has shift = 0.
constexpr double kHugeLse = 524288.0;  // 2^19

FASTCE_RULE bool huge_lse(double lse) { return std::fabs(lse) >= kHugeLse && std::fabs(lse) < INFINITY; }

struct RowLse {
  double shift, rel;
};
// From a row's statistics: its max and sum of exp(z - max); NaN when a logit is NaN, -inf
// when all are -inf or there are none (a slice of the vocabulary that holds nothing adds
// nothing; a row's loss is then -inf - -inf = NaN, as torch's).
FASTCE_RULE RowLse row_lse(double max, double sumexp, bool has_nan) {
  const double lse = has_nan ? NAN : max == -INFINITY ? -INFINITY : max + std::log(sumexp);
  return huge_lse(lse) ? RowLse{max, std::log(sumexp)} : RowLse{0.0, lse};
}
// A row's lse given as any shift + rel (the whole vocabulary's, merged from its slices'):
// kept apart where huge, as row_lse keeps it.
FASTCE_RULE RowLse split_lse(double shift, double rel) {
  const double lse = shift + rel;
  return huge_lse(lse) ? RowLse{shift, rel} : RowLse{0.0, lse};
}
// What a vocabulary slice gives the merge of the slices (python/fastce/parallel.py) for a row:
// its lse as max + log_sum (exact for every row, huge ones included; -inf, 0 for a slice that
// holds nothing finite; NaN, NaN where a logit is NaN), and the weight of the lse in its loss
// (the loss is linear in the lse: see class_row_lse_weight).
struct SliceLse {
  double max, log_sum, lse_weight;
};
FASTCE_RULE SliceLse slice_lse(double max, double sumexp, bool has_nan, double lse_weight) {
  if (has_nan) return {NAN, NAN, lse_weight};
  if (max == -INFINITY) return {-INFINITY, 0.0, lse_weight};
  return {max, std::log(sumexp), lse_weight};
}
FASTCE_RULE double full(const RowLse& l) { return l.shift + l.rel; }
// lse - z, exact for a shifted row too.
FASTCE_RULE double lse_minus(const RowLse& l, double z) {
  return l.shift != 0.0 ? (l.shift - z) + l.rel : l.rel - z;
}
// sum_c m_c (lse - z_c) from sum_m = sum_c m_c and sum_mz = sum_c m_c z_c. For a shifted row
// these float sums would cancel against shift * sum_m: the caller passes
// gap = sum_c m_c (shift - z_c), summed logit by logit in float64 (else 0).
FASTCE_RULE double weighted_lse_minus_z(const RowLse& l, double sum_m, double sum_mz, double gap) {
  return l.shift != 0.0 ? gap + l.rel * sum_m : full(l) * sum_m - sum_mz;
}

// ---- probability targets -----------------------------------------------------------------
// With label smoothing a probability target y becomes y' = (1 - eps) y + eps / C, formed per
// class (as torch does) so that a masked class (z = -inf) with y = 0 still counts
// eps / C * -inf rather than 0 * -inf = NaN: y' = y * keep + add, in the accumulation type.
template <class A>
struct SmoothedTarget {
  A keep, add;
};
template <class A>
FASTCE_RULE SmoothedTarget<A> smoothed_target(double eps, int64_t classes) {
  return {A(1.0 - eps), A(eps / double(classes))};
}

// ---- the rules for a vector of rows ----------------------------------------------------
// The spatial and few-class CPU kernels (cpu/lanes_kernels_impl.h) take a SIMD vector of rows
// (positions) at once, in the accumulation type. These are the rules' forms they use, written
// with arithmetic only, for V = a float, a double or a GCC vector of them (S: its scalar); the
// row rules below are these with V = double. Such a kernel keeps every row's lse as
// shift = its max, rel = log(sumexp) (exact for any lse: see RowLse) and its weighted sums as
// gaps, gap = sum_c m_c (shift - z_c), summed class by class.

// lse - z (lse_minus of a shifted row).
template <class V>
FASTCE_RULE V lse_minus_lanes(V shift, V rel, V z) {
  return (shift - z) + rel;
}
// sum_c m_c (lse - z_c) (weighted_lse_minus_z of a shifted row).
template <class V>
FASTCE_RULE V weighted_lse_minus_z_lanes(V rel, V sum_m, V gap) {
  return gap + rel * sum_m;
}
// Cross-entropy of rows with a class index (class_row_loss): w_t the target's weight (0 where
// it adds nothing), lse_minus_zt = lse - z_t, smooth_sum = sum_c w_c (lse - z_c), used only
// when smoothing (label smoothing, over classes whose weights do not all vanish).
template <class V, class S>
FASTCE_RULE V class_loss_lanes(V w_t, V lse_minus_zt, V smooth_sum, S eps, S vocab, bool smoothing) {
  V ce = (S(1) - eps) * w_t * lse_minus_zt;
  if (smoothing) ce += eps / vocab * smooth_sum;
  return ce;
}
// The z-loss of rows (z_loss; the caller skips it when lse_square_scale is 0).
template <class V, class S>
FASTCE_RULE V z_loss_lanes(S lse_square_scale, V lse) {
  return lse_square_scale * lse * lse;
}
// The gradient coefficients of rows (see GradCoef): g and g_z the rows' incoming gradients
// of their cross-entropy and z-loss as row_grads gives them (divided by the mean's divisors);
// m = the row's weight w_r for class indices, probability targets' sum_c w_c y_c
// (unsmoothed) for them.
template <class V>
struct GradCoefLanes {
  V coef_p, coef_w, coef_wy, coef_target, coef_grad_y;
};
template <class V, class S>
FASTCE_RULE GradCoefLanes<V> grad_coef_lanes(V lse, V g, V g_z, bool prob, V m, S eps, S vocab,
                                             S weight_sum_all, S lse_square_scale) {
  const S smooth = eps > 0 ? eps / vocab * weight_sum_all : S(0);
  const V zl = S(2) * lse_square_scale * lse * g_z;
  GradCoefLanes<V> k{};
  if (eps > 0) k.coef_w = g * eps / vocab;
  if (prob) {
    k.coef_p = g * ((S(1) - eps) * m + smooth) + zl;
    k.coef_wy = g * (S(1) - eps);
    k.coef_grad_y = g * (S(1) - eps);
  } else {
    k.coef_p = g * ((S(1) - eps) * m + smooth) + zl;
    k.coef_target = g * (S(1) - eps) * m;
  }
  return k;
}

// ---- a row's loss -------------------------------------------------------------------------
// What a row's loss needs besides its lse. Class-index targets: m_c = w_c; probability
// targets: m_c = w_c y'_c with y' = (1 - eps) y + eps / V folded in by the kernels.
struct RowSums {
  double sum_wz;   // sum_c w_c z_c over the input's classes (label smoothing, class indices)
  double sum_wyz;  // probability targets: sum_c w_c y'_c z_c
  double sum_wy;   // probability targets: sum_c w_c y'_c
  double gap;      // huge rows: sum_c m_c (shift - z_c), else 0 (see weighted_lse_minus_z)
};

// Cross-entropy of a row with a class index. target_here: the target lies in this input
// (always, except for vocabulary-parallel slices); w_t its class weight, z_t its
// transformed logit; weight_sum = sum_c w_c over the input's classes; V the vocabulary.
FASTCE_RULE double class_row_loss(const RowLse& l, bool target_here, double w_t, double z_t, double eps,
                                  double V, double weight_sum, const RowSums& s) {
  // (A slice of the vocabulary that holds no class adds nothing, even with an lse of -inf.)
  const bool smoothing = eps > 0 && weight_sum != 0;
  return class_loss_lanes(target_here ? w_t : 0.0, target_here ? lse_minus(l, z_t) : 0.0,
                          smoothing ? weighted_lse_minus_z(l, weight_sum, s.sum_wz, s.gap) : 0.0, eps, V, smoothing);
}

// d class_row_loss / d lse = sum_c m_c: how much of the lse a row's loss holds. A slice's loss
// against the whole vocabulary's lse L is its loss against its own lse_k plus this weight times
// L - lse_k.
FASTCE_RULE double class_row_lse_weight(bool target_here, double w_t, double eps, double V, double weight_sum) {
  return (target_here ? (1.0 - eps) * w_t : 0.0) + (eps > 0 && weight_sum != 0 ? eps / V * weight_sum : 0.0);
}

// Cross-entropy of a row with probability targets: sum_c w_c y'_c (lse - z_c).
FASTCE_RULE double prob_row_loss(const RowLse& l, const RowSums& s) {
  return weighted_lse_minus_z(l, s.sum_wy, s.sum_wyz, s.gap);
}

// The z-loss of a non-ignored row (PaLM): lse_square_scale * lse^2. As Liger-Kernel defines it
// with class weights: not weighted (it regularizes the log-partition of every counted row,
// whatever its target's weight).
FASTCE_RULE double z_loss(double lse_square_scale, double lse) {
  return lse_square_scale > 0 ? z_loss_lanes(lse_square_scale, lse) : 0.0;
}

// ---- the reduction ------------------------------------------------------------------------
// 'mean' divides the cross-entropy by the total weight: the sum of the non-ignored rows'
// target weights (their count without class weights; the row count for probability
// targets), as torch; and the z-loss by the count of non-ignored rows (Liger-Kernel's
// definition; every row counts for probability targets). Without class weights the two are
// equal. Nothing to average gives 0 / 0 = NaN, as torch. The ops' total_weight output holds
// both, in this order.
struct Divisors {
  double ce;  // the total weight
  double z;   // the count of non-ignored rows
};
FASTCE_RULE double reduce_sum(double sum, double divisor, int64_t reduction) {
  if (reduction != kMean) return sum;
  return divisor == 0.0 ? NAN : sum / divisor;
}
// The reduced loss (cross-entropy plus z-loss) and z-loss, from the sums over the rows of
// their losses (z-loss included) and of their z-losses.
struct Reduced {
  double loss, z_loss;
};
FASTCE_RULE Reduced reduce_losses(double sum_loss, double sum_z, const Divisors& d, int64_t reduction) {
  const double z = reduce_sum(sum_z, d.z, reduction);
  if (reduction != kMean || d.ce == d.z || sum_z == 0.0) return {reduce_sum(sum_loss, d.ce, reduction), z};
  return {reduce_sum(sum_loss - sum_z, d.ce, reduction) + z, z};
}
// A row's incoming gradients divided by the mean's divisors (as the op's total_weight output
// holds them): ce multiplies the row's cross-entropy, z its z-loss, which both the loss and the
// z-loss output hold.
struct RowGrads {
  double ce, z;
};
FASTCE_RULE RowGrads row_grads(double grad_loss, double grad_z_loss, const Divisors& d, int64_t reduction) {
  const bool mean = reduction == kMean;
  return {grad_loss / (mean ? d.ce : 1.0), (grad_loss + grad_z_loss) / (mean ? d.z : 1.0)};
}

// ---- a row's gradient ---------------------------------------------------------------------
// The gradient of a row in z-space is
//   p_c * coef_p - w_c * (coef_w + coef_wy * y_c) - coef_target * [c == target]
// with p = softmax(z) = exp(z - lse_shift - lse). The incoming gradients, the reduction,
// label smoothing and the z-loss are folded into these coefficients here.
struct GradCoef {
  double lse_shift;     // see RowLse
  double lse;
  double coef_p;
  double coef_w;
  double coef_wy;       // probability targets only
  int64_t target;       // class-index targets: the target's index in this input, else -1
  double coef_target;
  double coef_grad_y;   // probability targets: d loss / d y_c = coef_grad_y * w_c * (lse - z_c)
};

// rg: the row's incoming gradients (row_grads). w_r: the row's weight (target weight, 1 for
// probability targets); weight_sum_all = sum_c w_c over the whole vocabulary of V classes; sum_wy: probability
// targets' sum_c w_c y_c (unsmoothed); target: index in this input or -1.
FASTCE_RULE GradCoef grad_coef(const RowLse& l, const RowGrads& rg, bool prob, double w_r, int64_t target,
                               double eps, double V, double weight_sum_all, double lse_square_scale,
                               double sum_wy) {
  const GradCoefLanes<double> c =
      grad_coef_lanes(full(l), rg.ce, rg.z, prob, prob ? sum_wy : w_r, eps, V, weight_sum_all, lse_square_scale);
  GradCoef k{};
  k.lse_shift = l.shift;
  k.lse = l.rel;
  k.coef_p = c.coef_p;
  k.coef_w = c.coef_w;
  k.coef_wy = c.coef_wy;
  k.coef_grad_y = c.coef_grad_y;
  k.target = prob ? -1 : target;
  k.coef_target = c.coef_target;
  return k;
}

}  // namespace fastce

// ---- per-token outputs: log-probs and entropy (fastce.token_logprobs, fastce.entropy) -------
// The rules of the token ops (csrc/cpu/token_*.cpp, python/fastce/token.py), kept apart from
// the loss's rules above.
namespace fastce {

// The options of the token ops, in their schemas' order (csrc/ops.cpp: kTokenOptionsSchema;
// python/fastce/token.py: TokenOptions).
struct TokenOptions {
  double temperature = 1.0;
  double logit_scale = 1.0;
  double softcap = 0.0;  // 0: off
};

// The token ops' logit transform: logit_scale, then softcap, then / temperature. The
// temperature is folded into the loss's transform (its scale and cap), so that z and
// dz/dx come from the same rules: z = cap/T * tanh(x * scale/cap) or z = x * scale/T.
template <class A>
FASTCE_RULE LogitTransform<A> token_transform(const TokenOptions& o) {
  const double inv_t = 1.0 / o.temperature;
  return {A(o.logit_scale * inv_t), A(o.softcap * inv_t), o.softcap > 0 ? A(o.logit_scale / o.softcap) : A(0)};
}
// Whether the transform is the identity (z = x: no multiply).
FASTCE_RULE bool token_identity(const TokenOptions& o) {
  return o.softcap <= 0 && o.logit_scale / o.temperature == 1.0;
}

// A row's statistics for the log-probs and the entropy, relative to its running max m:
//   sumexp = sum_c exp(z_c - m),  sum_ed = sum_c exp(z_c - m) * (z_c - m)
// A class with z = -inf (a masked token) has zero probability and adds nothing to either
// (the kernels skip its 0 * -inf). Merged left to right; a block whose max is -inf is empty.
// argmax (when the kernels track it): the index of the row's first NaN if it has one, else of
// its first largest z (the first class when all are -inf), as torch.argmax; -1: none yet.
struct TokenStats {
  double max = -INFINITY;
  double sumexp = 0.0;
  double sum_ed = 0.0;
  bool has_nan = false;
  int64_t argmax = -1;
};
// Whether b's argmax replaces a's: a NaN first, then the larger max, then (a tie) the lower
// index. Symmetric, so that pieces may merge in any order (the CUDA butterfly).
FASTCE_RULE bool token_argmax_wins(const TokenStats& a, const TokenStats& b) {
  if (b.argmax < 0) return false;
  if (a.argmax < 0) return true;
  if (a.has_nan != b.has_nan) return b.has_nan;
  if (!a.has_nan && a.max != b.max) return b.max > a.max;
  return b.argmax < a.argmax;
}
// b follows a in the row. Rebasing a's sums to a larger max M: each exp(z - m) gains the
// factor alpha = exp(m - M) and each (z - m) becomes (z - m) + (m - M).
FASTCE_RULE void merge_token_stats(TokenStats& a, const TokenStats& b) {
  if (token_argmax_wins(a, b)) a.argmax = b.argmax;
  a.has_nan = a.has_nan || b.has_nan;
  if (b.max == -INFINITY) return;  // nothing but -inf (and NaN): no mass
  if (a.max == -INFINITY) {
    a.max = b.max;
    a.sumexp = b.sumexp;
    a.sum_ed = b.sum_ed;
    return;
  }
  if (b.max > a.max) {
    const double d = a.max - b.max, alpha = std::exp(d);
    a.sum_ed = alpha * (a.sum_ed + d * a.sumexp) + b.sum_ed;
    a.sumexp = alpha * a.sumexp + b.sumexp;
    a.max = b.max;
  } else {
    const double d = b.max - a.max, beta = std::exp(d);
    a.sum_ed += beta * (b.sum_ed + d * b.sumexp);
    a.sumexp += beta * b.sumexp;
  }
}
// The row's log-sum-exp: NaN with a NaN logit, -inf when every logit is -inf (as torch's
// log_softmax then gives NaN log-probs: -inf - -inf).
FASTCE_RULE double token_lse(const TokenStats& s) {
  if (s.has_nan) return NAN;
  return s.max == -INFINITY ? -INFINITY : s.max + std::log(s.sumexp);
}
// The entropy -sum_c p_c log p_c = lse - sum_c p_c z_c = log(sumexp) - sum_ed / sumexp: finite
// for a row with masked (-inf) classes, NaN for a row that is all -inf (no distribution).
FASTCE_RULE double token_entropy(const TokenStats& s) {
  if (s.has_nan || s.max == -INFINITY) return NAN;
  return std::log(s.sumexp) - s.sum_ed / s.sumexp;
}
// log p_k = z_k - lse: -inf for a masked token of a row with mass.
FASTCE_RULE double token_logprob(double z_k, double lse) { return z_k - lse; }

// The gradient of a row in z-space for the incoming gradients g_k of its log-probs (summed:
// g_sum) and g_h of its entropy, with mean_z = sum_c p_c z_c = lse - entropy:
//   d/dz_c = sum_k g_k [c == index_k] - p_c (g_sum + g_h (z_c - mean_z))
// (d log p_k / dz = onehot_k - p; dH / dz = -p (z - mean_z)). A class of zero probability
// (masked) gets no share: its z - mean_z may be infinite.
// V: a scalar or a vector of lanes (the CPU kernels), S its scalar type.
template <class V, class S>
FASTCE_RULE V token_grad_shared(const V& p, const V& z, S g_sum, S g_h, S mean_z) {
  const V g = -p * (g_sum + g_h * (z - mean_z));
  return p == S(0) ? p : g;  // (p is +0 there)
}
// The entropy's mean_z (only needed when the entropy has a gradient).
FASTCE_RULE double token_mean_z(double lse, double entropy) { return lse - entropy; }

}  // namespace fastce
