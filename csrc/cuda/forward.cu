// Forward kernels: per-row (or per-piece) online-softmax statistics, the per-row loss,
// and the fixed-order reduction. See docs/CUDA.md for the design.
#include "common.cuh"

namespace fastce::cuda {
namespace {

static_assert(sizeof(Stats<float>) == kPartialValues * sizeof(float), "a piece's statistics: see ForwardArgs");
constexpr int kReduceThreads = 1024;

// sum_c m_c (shift - z_c) over one row in double, with m_c = w_c (yr null) or w_c y'_c
// (probability targets): RowSums::gap, for rows with a huge lse only. Each lane sums its
// classes logit by logit in double, then the butterfly: warp-parallel and in a fixed order.
// All 32 lanes call it.
template <class T, class A, bool Cap>
__device__ double weighted_gap(const Rows& v, const T* xr, const T* yr, const Transform<A, Cap>& tf, double shift,
                               int lane) {
  const A* w = static_cast<const A*>(v.weight);
  const double eps = v.opt.label_smoothing, C = double(v.classes);
  double gap = 0.0;
  for (int64_t c = lane; c < v.classes; c += kWarp) {
    const A wc = w != nullptr ? w[c] : A(1);
    const double m = yr != nullptr ? (1.0 - eps) * double(A(load1(yr + c)) * wc) + eps / C * double(wc) : double(wc);
    gap += m * (shift - double(tf.z(A(load1(xr + c)))));
  }
  return warp_sum(gap);
}

// v rounded once to the dtype d, at p[i].
__device__ void store_as(Dtype d, void* p, int64_t i, double v) {
  switch (d) {
    case Dtype::Float64: return store_double(static_cast<double*>(p) + i, v);
    case Dtype::BFloat16: return store_double(static_cast<__nv_bfloat16*>(p) + i, v);
    case Dtype::Float16: return store_double(static_cast<__half*>(p) + i, v);
    default: return store_double(static_cast<float*>(p) + i, v);
  }
}

// What a row leaves for the reduction: its lse and weight; with reduction 'none' its loss and
// z-loss in loss_dtype (the op's output), else in double for reduce_kernel.
// (A vocabulary slice's lse is its SliceLse, three values a row: the caller writes it.)
__device__ void write_row(const ForwardArgs& a, int64_t r, double lse, double loss, double zloss, double weight) {
  if (a.v.opt.vocab_size < 0) a.lse[r] = lse;
  a.row_weight[r] = weight;
  if (a.v.opt.reduction == kNone) {
    store_as(a.loss_dtype, a.loss_out, r, loss);
    store_as(a.loss_dtype, a.zloss_out, r, zloss);
  } else {
    a.row_loss[r] = loss;
    a.row_zloss[r] = zloss;
  }
}

// The loss of row r from its merged statistics (identical on every lane after warp_merge), by
// the rules the CPU backend uses (rules.h), in double. All 32 lanes call it (a huge row's gap
// is a warp sum); lane 0 writes.
template <class T, bool Prob, bool Cap>
__device__ void finish_row(const ForwardArgs& a, int64_t r, const Stats<acc_t<T>>& st,
                           const Transform<acc_t<T>, Cap>& tf, int lane) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const RowTarget t = Prob ? RowTarget{false, -1} : target_of(v, r);
  const bool slice = v.opt.vocab_size >= 0;  // a.lse holds rules.h's SliceLse per row
  if (t.ignored) {
    if (lane != 0) return;
    write_row(a, r, 0.0, 0.0, 0.0, 0.0);
    if (slice) a.lse[3 * r] = a.lse[3 * r + 1] = a.lse[3 * r + 2] = 0.0;
    return;
  }
  const A* w = static_cast<const A*>(v.weight);
  const T* xr = static_cast<const T*>(v.x) + r * v.x_stride;
  const T* yr = Prob ? static_cast<const T*>(v.y) + r * v.y_stride : nullptr;
  const double eps = v.opt.label_smoothing;
  const RowLse l = lse_of(st);
  const bool needs_gap = l.shift != 0.0 && (Prob || eps > 0);  // warp-uniform
  const double gap = needs_gap ? weighted_gap(v, xr, yr, tf, l.shift, lane) : 0.0;
  if (lane != 0) return;
  const RowSums sums{double(st.wz), double(st.wyz), double(st.wy), gap};
  const bool here = t.local >= 0;
  const double w_r = here && w != nullptr ? double(w[t.local]) : 1.0;
  double ce;
  if constexpr (Prob) {
    ce = prob_row_loss(l, sums);
  } else {
    const double z_t = here ? double(tf.z(A(load1(xr + t.local)))) : 0.0;
    ce = class_row_loss(l, here, w_r, z_t, eps, double(vocabulary(v.opt, v.classes)), class_weight_sum(v), sums);
  }
  const double zl = z_loss(v.opt.lse_square_scale, full(l));
  write_row(a, r, full(l), ce + zl, zl, w_r);
  if (!slice) return;
  // (Slices take class-index targets: Prob is false.)
  const double lse_weight = class_row_lse_weight(here, w_r, eps, double(vocabulary(v.opt, v.classes)),
                                                 class_weight_sum(v));
  const SliceLse s = slice_lse(double(st.m), double(st.top) + double(st.rest), l.rel != l.rel, lse_weight);
  a.lse[3 * r] = s.max;
  a.lse[3 * r + 1] = s.log_sum;
  a.lse[3 * r + 2] = s.lse_weight;
}

// One warp per unit (row, or piece of a row when v.chunks > 1).
template <class T, bool Prob, bool Cap>
__global__ void __launch_bounds__(kThreads) stats_kernel(const __grid_constant__ ForwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v.opt);
  const SumsOf<A> sums = sums_of<A, Prob>(v);
  const int64_t units = v.rows * v.chunks;
  for_each_warp_item(units, [&](int64_t u) {
    const Unit un = unit_of(v, u);
    const T* xr = static_cast<const T*>(v.x) + un.row * v.x_stride;
    const T* yr = Prob ? static_cast<const T*>(v.y) + un.row * v.y_stride : nullptr;
    Stats<A> st;
    if (!ignored_row(v, un.row)) st = lane_stats<Prob>(xr, yr, tf, sums, un.begin, un.end, lane);
    warp_merge(st);
    if (v.chunks == 1) {
      finish_row<T, Prob, Cap>(a, un.row, st, tf, lane);
    } else if (lane == 0) {
      static_cast<Stats<A>*>(a.partial)[u] = st;
    }
  });
}

// Rows cut into pieces: one warp merges a row's pieces in a fixed order, then finishes it.
template <class T, bool Prob, bool Cap>
__global__ void __launch_bounds__(kThreads) merge_kernel(const __grid_constant__ ForwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v.opt);
  for_each_warp_item(v.rows, [&](int64_t r) {
    const Stats<A>* parts = static_cast<const Stats<A>*>(a.partial) + r * v.chunks;
    Stats<A> st;
    for (int64_t j = lane; j < v.chunks; j += kWarp) merge(st, parts[j]);
    warp_merge(st);
    finish_row<T, Prob, Cap>(a, r, st, tf, lane);
  });
}

// Sums four values per thread over one block, then a fixed tree: the same order on every run
// (no atomics).
constexpr int kSums = kReduceSums;
__device__ void block_sum(double (&v)[kSums]) {
  __shared__ double sh[kSums][kReduceThreads];
  for (int i = 0; i < kSums; ++i) sh[i][threadIdx.x] = v[i];
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half)
      for (int i = 0; i < kSums; ++i) sh[i][threadIdx.x] += sh[i][threadIdx.x + half];
    __syncthreads();
  }
  for (int i = 0; i < kSums; ++i) v[i] = sh[i][0];
}

// The four sums the reduction needs (losses, z-losses, weights, non-ignored rows) over the rows
// [b, e) (parts == 1; the losses only for 'mean'/'sum'), or over the first stage's parts [b, e)
// (parts > 1), each thread over a fixed stride, then block_sum.
__device__ void reduce_sums(const ForwardArgs& a, int64_t parts, int64_t b, int64_t e, double (&sums)[kSums]) {
  for (int i = 0; i < kSums; ++i) sums[i] = 0.0;
  const bool losses = a.row_loss != nullptr;
#pragma unroll 4
  for (int64_t j = b + threadIdx.x; j < e; j += kReduceThreads) {
    if (parts > 1) {
      for (int i = 0; i < kSums; ++i) sums[i] += a.reduce_partial[i * parts + j];
    } else {
      if (losses) {
        sums[0] += a.row_loss[j];
        sums[1] += a.row_zloss[j];
      }
      sums[2] += a.row_weight[j];
      sums[3] += ignored_row(a.v, j) ? 0.0 : 1.0;
    }
  }
  block_sum(sums);
}

// First stage of a long reduction (reduce_parts(rows) > 1): block k sums rows
// [k * kReduceRowsPerBlock, (k + 1) * kReduceRowsPerBlock) into reduce_partial[i * parts + k].
// Fixed ranges and order: deterministic.
__global__ void __launch_bounds__(kReduceThreads) partial_sums_kernel(const __grid_constant__ ForwardArgs a) {
  const int64_t b = int64_t(blockIdx.x) * kReduceRowsPerBlock;
  const int64_t e = b + kReduceRowsPerBlock < a.v.rows ? b + kReduceRowsPerBlock : a.v.rows;
  double sums[kSums];
  reduce_sums(a, 1, b, e, sums);
  if (threadIdx.x == 0)
    for (int i = 0; i < kSums; ++i) a.reduce_partial[i * int64_t(gridDim.x) + blockIdx.x] = sums[i];
}

// The per-row losses, z-losses and weights (or the first stage's sums of them, parts > 1)
// summed in a fixed order: the mean's divisors (the total weight, the non-ignored rows) and,
// for 'mean' and 'sum', the reduced loss and z-loss (rules.h: reduce_losses).
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(const __grid_constant__ ForwardArgs a, int64_t parts) {
  double sums[kSums];
  reduce_sums(a, parts, 0, parts > 1 ? parts : a.v.rows, sums);
  if (threadIdx.x == 0) {
    const Dtype acc = a.v.dtype == Dtype::Float64 ? Dtype::Float64 : Dtype::Float32;
    store_as(acc, a.total_weight, 0, sums[2]);
    store_as(acc, a.total_weight, 1, sums[3]);
    if (a.v.opt.reduction != kNone) {
      const Reduced red = reduce_losses(sums[0], sums[1], Divisors{sums[2], sums[3]}, a.v.opt.reduction);
      store_as(a.loss_dtype, a.loss_out, 0, red.loss);
      store_as(a.loss_dtype, a.zloss_out, 0, red.z_loss);
    }
  }
}

template <class A>
__global__ void __launch_bounds__(kReduceThreads) weight_sum_kernel(const A* w, int64_t n, double* out) {
  double sums[kSums] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) sums[0] += double(w[i]);
  block_sum(sums);
  if (threadIdx.x == 0) *out = sums[0];
}

}  // namespace

int64_t plan_chunk(int64_t rows, int64_t classes, Dtype dtype, int sm_count) {
  const int64_t vec = dtype == Dtype::Float64 ? 2 : dtype == Dtype::Float32 ? 4 : 8;
  const int64_t step = kWarp * vec * kBatch;            // elements a warp loads per step
  const int64_t want = int64_t(sm_count) * 16;          // warps that keep every SM streaming
  const int64_t whole = classes > 0 ? classes : 1;
  if (rows == 0 || rows >= want || classes <= 2 * step) return whole;
  const int64_t by_warps = (want + rows - 1) / rows;
  const int64_t by_size = classes / (2 * step);          // pieces of at least two steps
  const int64_t pieces = by_warps < by_size ? by_warps : by_size;
  if (pieces <= 1) return whole;
  const int64_t chunk = (classes + pieces - 1) / pieces;
  return (chunk + step - 1) / step * step;                // whole steps per piece
}

void launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  with_dtype(a.v.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_flag(a.v.y != nullptr, [&](auto prob) {
      with_flag(a.v.opt.softcap > 0, [&](auto cap) {
        constexpr bool kProb = decltype(prob)::value, kCap = decltype(cap)::value;
        const int64_t units = a.v.rows * a.v.chunks;
        if (units > 0) {
          stats_kernel<T, kProb, kCap><<<grid_for(units, kWarpsPerBlock), kThreads, 0, stream>>>(a);
          FASTCE_LAUNCH_CHECK();
          if (a.v.chunks > 1) {
            merge_kernel<T, kProb, kCap><<<grid_for(a.v.rows, kWarpsPerBlock), kThreads, 0, stream>>>(a);
            FASTCE_LAUNCH_CHECK();
          }
        }
      });
    });
  });
  const int64_t parts = reduce_parts(a.v.rows);
  if (parts > 1) {
    partial_sums_kernel<<<unsigned(parts), kReduceThreads, 0, stream>>>(a);
    FASTCE_LAUNCH_CHECK();
  }
  reduce_kernel<<<1, kReduceThreads, 0, stream>>>(a, parts);
  FASTCE_LAUNCH_CHECK();
}

void launch_weight_sum(Dtype dtype, const void* w, int64_t n, double* out, cudaStream_t stream) {
  if (dtype == Dtype::Float64)
    weight_sum_kernel<double><<<1, kReduceThreads, 0, stream>>>(static_cast<const double*>(w), n, out);
  else
    weight_sum_kernel<float><<<1, kReduceThreads, 0, stream>>>(static_cast<const float*>(w), n, out);
  FASTCE_LAUNCH_CHECK();
}

}  // namespace fastce::cuda
