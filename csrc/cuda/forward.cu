// Forward kernels: per-row (or per-piece) online-softmax statistics, the per-row loss,
// and the fixed-order reduction. See docs/CUDA.md for the design.
#include "common.cuh"

namespace fastce::cuda {
namespace {

constexpr int kPartial = 5;         // floats per piece: m, s, wz, wyz, wy
constexpr int kReduceThreads = 1024;

// sum_c m_c (max - z_c) over one row in double, logit by logit, with m_c = w_c (yr null) or
// w_c y'_c (probability targets, y' smoothed): for rows with a huge lse only (see kHugeLse),
// where the float sums of m_c z_c would cancel against max * sum_c m_c.
template <class T, class A, bool Cap>
__device__ double weighted_gap(const Rows& v, const T* xr, const T* yr, const Transform<A, Cap>& tf, double max) {
  const A* w = static_cast<const A*>(v.weight);
  const double eps = v.label_smoothing, C = double(v.classes);
  double gap = 0.0;
  for (int64_t c = 0; c < v.classes; ++c) {
    const double wc = w != nullptr ? double(w[c]) : 1.0;
    const double m = yr != nullptr ? (1.0 - eps) * wc * double(A(load1(yr + c))) + eps / C * wc : wc;
    gap += m * (max - double(tf.z(A(load1(xr + c)))));
  }
  return gap;
}

// Lane 0 of the row's warp: the loss of row r from its merged statistics, exactly as the
// CPU backend combines them (in double).
template <class T, bool Prob, bool Cap>
__device__ void finish_row(const ForwardArgs& a, int64_t r, const Stats<acc_t<T>>& st,
                           const Transform<acc_t<T>, Cap>& tf) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  double* lse = static_cast<double*>(a.lse);
  A* row_loss = static_cast<A*>(a.row_loss);
  A* row_zloss = static_cast<A*>(a.row_zloss);
  A* row_w = static_cast<A*>(a.row_weight);
  const A* w = static_cast<const A*>(v.weight);
  const int64_t t = Prob ? 0 : v.target[r];
  if (!Prob && t == v.ignore_index) {
    lse[r] = 0.0;
    row_loss[r] = row_zloss[r] = row_w[r] = A(0);
    return;
  }
  const double eps = v.label_smoothing, C = double(v.classes);
  const double log_sum = log(double(st.s));
  const double l = st.m == -INFINITY ? NAN : double(st.m) + log_sum;
  const bool huge = huge_lse(l);  // then lse - z = (max - z) + log(sum), see kHugeLse
  const T* xr = static_cast<const T*>(v.x) + r * v.x_stride;
  // sum_c m_c (lse - z_c) from sum_m = sum_c m_c and sum_mz = sum_c m_c z_c (see weighted_gap)
  auto weighted_lse_minus_z = [&](double sum_m, double sum_mz, const T* yr) {
    return huge ? weighted_gap(v, xr, yr, tf, double(st.m)) + log_sum * sum_m : l * sum_m - sum_mz;
  };
  const double ws = eps > 0 && w != nullptr ? *v.weight_sum : C;  // sum of the class weights
  const double smooth = eps > 0 ? eps / C * ws : 0.0;
  double ce, w_r = 1.0;
  if constexpr (Prob) {
    const double wy = (1.0 - eps) * double(st.wy) + smooth;
    const double wyz = (1.0 - eps) * double(st.wyz) + (eps > 0 ? eps / C * double(st.wz) : 0.0);
    ce = weighted_lse_minus_z(wy, wyz, static_cast<const T*>(v.y) + r * v.y_stride);
  } else {
    const bool in_range = t >= 0 && t < v.classes;
    CUDA_KERNEL_ASSERT(t >= 0 && t < v.classes && "Target is out of bounds");
    // Should asserts ever be compiled out, a bad target still reads nothing.
    w_r = in_range && w != nullptr ? double(w[t]) : 1.0;
    const double z_t = in_range ? double(tf.z(A(load1(xr + t)))) : NAN;
    ce = (1.0 - eps) * w_r * (huge ? (double(st.m) - z_t) + log_sum : l - z_t);
    if (eps > 0) ce += eps / C * weighted_lse_minus_z(ws, double(st.wz), static_cast<const T*>(nullptr));
  }
  const double zl = v.lse_square_scale > 0 ? v.lse_square_scale * w_r * l * l : 0.0;
  row_loss[r] = A(ce + zl);
  row_zloss[r] = A(zl);
  lse[r] = l;
  row_w[r] = A(w_r);
}

// One warp per unit (row, or piece of a row when v.chunks > 1).
template <class T, bool Prob, bool Cap>
__global__ void __launch_bounds__(kThreads) stats_kernel(const ForwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v);
  const A* w = static_cast<const A*>(v.weight);
  const bool need_wz = v.label_smoothing > 0;
  const int64_t units = v.rows * v.chunks;
  for (int64_t u = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; u < units;
       u += int64_t(gridDim.x) * kWarpsPerBlock) {
    const Unit un = unit_of(v, u);
    const T* xr = static_cast<const T*>(v.x) + un.row * v.x_stride;
    const T* yr = Prob ? static_cast<const T*>(v.y) + un.row * v.y_stride : nullptr;
    Stats<A> st;
    if (Prob || v.target[un.row] != v.ignore_index)  // ignored rows read no logits
      st = lane_stats<Prob>(xr, yr, tf, w, need_wz, un.begin, un.end, lane);
    warp_merge(st);
    if (lane == 0) {
      if (v.chunks == 1) {
        finish_row<T, Prob, Cap>(a, un.row, st, tf);
      } else {
        A* part = static_cast<A*>(a.partial) + u * kPartial;
        part[0] = st.m; part[1] = st.s; part[2] = st.wz; part[3] = st.wyz; part[4] = st.wy;
      }
    }
  }
}

// Rows cut into pieces: one warp merges a row's pieces in a fixed order, then finishes it.
template <class T, bool Prob, bool Cap>
__global__ void __launch_bounds__(kThreads) merge_kernel(const ForwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v);
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; r < v.rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const A* part = static_cast<const A*>(a.partial) + r * v.chunks * kPartial;
    Stats<A> st;
    for (int64_t j = lane; j < v.chunks; j += kWarp) {
      Stats<A> o;
      o.m = part[j * kPartial]; o.s = part[j * kPartial + 1]; o.wz = part[j * kPartial + 2];
      o.wyz = part[j * kPartial + 3]; o.wy = part[j * kPartial + 4];
      merge(st, o);
    }
    warp_merge(st);
    if (lane == 0) finish_row<T, Prob, Cap>(a, r, st, tf);
  }
}

// Sums three per-row arrays over one block, each thread over a fixed stride, then a
// fixed tree: the same order on every run (no atomics).
__device__ void block_sum(double (&v)[3]) {
  __shared__ double sh[3][kReduceThreads];
  for (int i = 0; i < 3; ++i) sh[i][threadIdx.x] = v[i];
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half)
      for (int i = 0; i < 3; ++i) sh[i][threadIdx.x] += sh[i][threadIdx.x + half];
    __syncthreads();
  }
  for (int i = 0; i < 3; ++i) v[i] = sh[i][0];
}

template <class T>
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(const ForwardArgs a) {
  using A = acc_t<T>;
  const A* loss = static_cast<const A*>(a.row_loss);
  const A* zloss = static_cast<const A*>(a.row_zloss);
  const A* rw = static_cast<const A*>(a.row_weight);
  double sums[3] = {0.0, 0.0, 0.0};
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < a.v.rows; i += kReduceThreads) {
    sums[0] += double(loss[i]);
    sums[1] += double(zloss[i]);
    sums[2] += double(rw[i]);
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    *static_cast<A*>(a.total_weight) = A(sums[2]);
    if (a.reduction != 0) {
      const double div = a.reduction == 1 ? sums[2] : 1.0;
      *static_cast<T*>(a.loss_out) = from_double<T>(sums[0] / div);
      *static_cast<T*>(a.zloss_out) = from_double<T>(sums[1] / div);
    }
  }
}

template <class A>
__global__ void __launch_bounds__(kReduceThreads) weight_sum_kernel(const A* w, int64_t n, double* out) {
  double sums[3] = {0.0, 0.0, 0.0};
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
      with_flag(a.v.softcap > 0, [&](auto cap) {
        constexpr bool kProb = decltype(prob)::value, kCap = decltype(cap)::value;
        const int64_t units = a.v.rows * a.v.chunks;
        if (units > 0) {
          stats_kernel<T, kProb, kCap><<<grid_for(units, kWarpsPerBlock), kThreads, 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (a.v.chunks > 1) {
            merge_kernel<T, kProb, kCap><<<grid_for(a.v.rows, kWarpsPerBlock), kThreads, 0, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      });
    });
    reduce_kernel<T><<<1, kReduceThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_weight_sum(Dtype dtype, const void* w, int64_t n, double* out, cudaStream_t stream) {
  if (dtype == Dtype::Float64)
    weight_sum_kernel<double><<<1, kReduceThreads, 0, stream>>>(static_cast<const double*>(w), n, out);
  else
    weight_sum_kernel<float><<<1, kReduceThreads, 0, stream>>>(static_cast<const float*>(w), n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastce::cuda
