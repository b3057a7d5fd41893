// Forward kernels: per-row (or per-piece) online-softmax statistics, the per-row loss,
// and the fixed-order reduction. See docs/CUDA.md for the design.
#include "common.cuh"

namespace fastce::cuda {
namespace {

static_assert(sizeof(Stats<float>) == kPartialValues * sizeof(float), "a piece's statistics: see ForwardArgs");
constexpr int kReduceThreads = 1024;

// sum_c m_c (shift - z_c) over one row in double, logit by logit, with m_c = w_c (yr null) or
// w_c y'_c (probability targets): RowSums::gap, for rows with a huge lse only, computed as the
// CPU backend computes it.
template <class T, class A, bool Cap>
__device__ double weighted_gap(const Rows& v, const T* xr, const T* yr, const Transform<A, Cap>& tf, double shift) {
  const A* w = static_cast<const A*>(v.weight);
  const double eps = v.opt.label_smoothing, C = double(v.classes);
  double gap = 0.0;
  for (int64_t c = 0; c < v.classes; ++c) {
    const A wc = w != nullptr ? w[c] : A(1);
    const double m = yr != nullptr ? (1.0 - eps) * double(A(load1(yr + c)) * wc) + eps / C * double(wc) : double(wc);
    gap += m * (shift - double(tf.z(A(load1(xr + c)))));
  }
  return gap;
}

// Lane 0 of the row's warp: the loss of row r from its merged statistics, by the rules the CPU
// backend uses (rules.h), in double.
template <class T, bool Prob, bool Cap>
__device__ void finish_row(const ForwardArgs& a, int64_t r, const Stats<acc_t<T>>& st,
                           const Transform<acc_t<T>, Cap>& tf) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const RowTarget t = Prob ? RowTarget{false, -1} : target_of(v, r);
  const bool slice = v.opt.vocab_size >= 0;  // a.lse holds rules.h's SliceLse per row
  if (t.ignored) {
    a.row_loss[r] = a.row_zloss[r] = a.row_weight[r] = 0.0;
    if (slice) a.lse[3 * r] = a.lse[3 * r + 1] = a.lse[3 * r + 2] = 0.0; else a.lse[r] = 0.0;
    return;
  }
  const A* w = static_cast<const A*>(v.weight);
  const T* xr = static_cast<const T*>(v.x) + r * v.x_stride;
  const T* yr = Prob ? static_cast<const T*>(v.y) + r * v.y_stride : nullptr;
  const double eps = v.opt.label_smoothing;
  const RowLse l = lse_of(st);
  const bool needs_gap = l.shift != 0.0 && (Prob || eps > 0);
  const RowSums sums{double(st.wz), double(st.wyz), double(st.wy), needs_gap ? weighted_gap(v, xr, yr, tf, l.shift) : 0.0};
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
  a.row_loss[r] = ce + zl;
  a.row_zloss[r] = zl;
  a.row_weight[r] = w_r;
  if (!slice) {
    a.lse[r] = full(l);
    return;
  }
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
__global__ void __launch_bounds__(kThreads) stats_kernel(const ForwardArgs a) {
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
    if (lane == 0) {
      if (v.chunks == 1) {
        finish_row<T, Prob, Cap>(a, un.row, st, tf);
      } else {
        static_cast<Stats<A>*>(a.partial)[u] = st;
      }
    }
  });
}

// Rows cut into pieces: one warp merges a row's pieces in a fixed order, then finishes it.
template <class T, bool Prob, bool Cap>
__global__ void __launch_bounds__(kThreads) merge_kernel(const ForwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v.opt);
  for_each_warp_item(v.rows, [&](int64_t r) {
    const Stats<A>* parts = static_cast<const Stats<A>*>(a.partial) + r * v.chunks;
    Stats<A> st;
    for (int64_t j = lane; j < v.chunks; j += kWarp) merge(st, parts[j]);
    warp_merge(st);
    if (lane == 0) finish_row<T, Prob, Cap>(a, r, st, tf);
  });
}

// Sums four per-row values over one block, each thread over a fixed stride, then a
// fixed tree: the same order on every run (no atomics).
constexpr int kSums = 4;
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

// v rounded once to the dtype d, at p.
__device__ void store_as(Dtype d, void* p, double v) {
  switch (d) {
    case Dtype::Float64: return store_double(static_cast<double*>(p), v);
    case Dtype::BFloat16: return store_double(static_cast<__nv_bfloat16*>(p), v);
    case Dtype::Float16: return store_double(static_cast<__half*>(p), v);
    default: return store_double(static_cast<float*>(p), v);
  }
}

// The per-row losses, z-losses and weights summed in a fixed order: the mean's divisors (the
// total weight, the non-ignored rows) and, for 'mean' and 'sum', the reduced loss and z-loss
// (rules.h: reduce_losses).
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(const ForwardArgs a) {
  double sums[kSums] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < a.v.rows; i += kReduceThreads) {
    sums[0] += a.row_loss[i];
    sums[1] += a.row_zloss[i];
    sums[2] += a.row_weight[i];
    sums[3] += ignored_row(a.v, i) ? 0.0 : 1.0;
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    const Dtype acc = a.v.dtype == Dtype::Float64 ? Dtype::Float64 : Dtype::Float32;
    store_as(acc, a.total_weight, sums[2]);
    store_as(acc, static_cast<char*>(a.total_weight) + (acc == Dtype::Float64 ? 8 : 4), sums[3]);
    if (a.v.opt.reduction != kNone) {
      const Reduced red = reduce_losses(sums[0], sums[1], Divisors{sums[2], sums[3]}, a.v.opt.reduction);
      store_as(a.loss_dtype, a.loss_out, red.loss);
      store_as(a.loss_dtype, a.zloss_out, red.z_loss);
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
  reduce_kernel<<<1, kReduceThreads, 0, stream>>>(a);
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
