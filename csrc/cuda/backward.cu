// Backward kernels: the gradient of the logits (and of probability targets) in one
// pass, recomputing softmax from the logits and the saved lse. The math is the CPU
// backend's (csrc/cpu/row_kernels.h, GradCoef): in z-space the gradient of one row is
//   p_c * coef_p - w_c * (coef_w + coef_wy * y_c)  - coef_target at the target class,
// times dz/dx. The per-row coefficients fold in the incoming gradient, the reduction,
// label smoothing and the z-loss.
//
// The target class: p_t - 1 from exp(z_t - lse) keeps p_t's float rounding (about 1e-7),
// which is most of 1 - p_t on very confident rows. So the main pass sums p_c over the other
// classes, and target_kernel writes the target's gradient with 1 - p_t = sum_{c != t} p_c,
// accurate to float rounding however confident the row is.
#include "common.cuh"

namespace fastce::cuda {
namespace {

// Coefficients of one row (see GradCoef in csrc/cpu/row_kernels.h), computed in double.
template <class A>
struct Coefs {
  A cp, cw, cwy, ct, cp_minus_ct;
};

template <class A, bool Prob>
__device__ __forceinline__ Coefs<A> row_coefs(const BackwardArgs& a, int64_t r, int64_t t) {
  const Rows& v = a.v;
  const A* w = static_cast<const A*>(v.weight);
  const int64_t i = a.reduction == 0 ? r : 0;
  const double div = a.reduction == 1 ? double(*static_cast<const A*>(a.total_weight)) : 1.0;
  const double g = double(static_cast<const A*>(a.grad_loss)[i]) / div;
  const double g_z = double(static_cast<const A*>(a.grad_zloss)[i]) / div;
  const double eps = v.label_smoothing, C = double(v.classes), sq = v.lse_square_scale;
  const double ws = eps > 0 && w != nullptr ? *v.weight_sum : C;  // sum of the class weights
  const double smooth = eps > 0 ? eps / C * ws : 0.0;
  const double lse = static_cast<const double*>(a.lse)[r];
  const bool t_ok = !Prob && t >= 0 && t < v.classes;
  const double w_r = t_ok && w != nullptr ? double(w[t]) : 1.0;
  const double swy = Prob ? double(static_cast<const A*>(a.sum_wy)[r]) : w_r;
  const double cp = g * ((1.0 - eps) * swy + smooth) + 2.0 * sq * w_r * lse * (g + g_z);
  const double ct = Prob ? 0.0 : g * (1.0 - eps) * w_r;
  return {A(cp), A(eps > 0 ? g * eps / C : 0.0), A(g * (1.0 - eps)), A(ct), A(cp - ct)};
}

// Probability targets: sum over the row of w_c * y_c, one warp per row.
template <class T>
__global__ void __launch_bounds__(kThreads) sum_wy_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  constexpr int kVec = Traits<T>::kVec;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const A* w = static_cast<const A*>(v.weight);
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; r < v.rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const T* yr = static_cast<const T*>(v.y) + r * v.y_stride;
    A acc = 0;
    auto vecs = [&](int64_t c, auto n) {
      constexpr int N = decltype(n)::value;
      A y[N * kVec];
#pragma unroll
      for (int j = 0; j < N; ++j) load_vec(yr + c + j * kWarp * kVec, y + j * kVec);
#pragma unroll
      for (int k = 0; k < N * kVec; ++k)
        acc += w != nullptr ? y[k] * w[c + (k / kVec) * kWarp * kVec + k % kVec] : y[k];
    };
    auto one = [&](int64_t c) { acc += A(load1(yr + c)) * (w != nullptr ? w[c] : A(1)); };
    walk(yr, 0, v.classes, element_aligned(yr), lane, vecs, one);
    acc = warp_sum(acc);
    if (lane == 0) static_cast<A*>(a.sum_wy)[r] = acc;
  }
}

// Each row's lse as (shift, rel), one warp per row, before any gradient is written (in place,
// over the logits): the float64 lse split in two floats (z - shift - rel keeps what one float
// would round away, |lse| * 2^-24), or for a row whose lse is huge its max and log-sum again
// from the logits (see kHugeLse).
template <class T, bool Cap>
__global__ void __launch_bounds__(kThreads) lse_parts_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v);
  A* parts = static_cast<A*>(a.lse_parts);
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; r < v.rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const double lse = static_cast<const double*>(a.lse)[r];
    const bool ignored = v.y == nullptr && v.target[r] == v.ignore_index;
    if (ignored || !huge_lse(lse)) {
      const A hi = A(lse);
      if (lane == 0) parts[2 * r] = hi, parts[2 * r + 1] = fabs(lse) < INFINITY ? A(lse - double(hi)) : A(0);
      continue;
    }
    const T* xr = static_cast<const T*>(v.x) + r * v.x_stride;
    Stats<A> st = lane_stats<false>(xr, static_cast<const T*>(nullptr), tf, static_cast<const A*>(nullptr), false,
                                    0, v.classes, lane);
    warp_merge(st);
    if (lane == 0) parts[2 * r] = st.m, parts[2 * r + 1] = log_acc(st.s);
  }
}

// One warp per unit (row, or piece of a row). gx may be x itself (in-place backward):
// every element is read and then written by the same lane, and the target's logit is
// saved before any lane writes (see the __syncwarp below).
template <class T, bool Prob, bool Cap, bool GradY>
__global__ void __launch_bounds__(kThreads) grad_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  constexpr int kVec = Traits<T>::kVec;
  constexpr int64_t kStride = kWarp * kVec;  // elements between a lane's vectors (a power of 2)
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v);
  const A* w = static_cast<const A*>(v.weight);
  // Class weights enter only through coef_w (label smoothing) and coef_wy (targets).
  const bool need_w = w != nullptr && (Prob || v.label_smoothing > 0);
  const int64_t units = v.rows * v.chunks;
  for (int64_t u = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; u < units;
       u += int64_t(gridDim.x) * kWarpsPerBlock) {
    const Unit un = unit_of(v, u);
    const int64_t r = un.row;
    const T* xr = static_cast<const T*>(v.x) + r * v.x_stride;
    const T* yr = Prob ? static_cast<const T*>(v.y) + r * v.y_stride : nullptr;
    T* gxr = static_cast<T*>(a.gx) + r * a.gx_stride;
    T* gyr = GradY ? static_cast<T*>(a.gy) + r * a.gy_stride : nullptr;
    const int64_t t = Prob ? -1 : v.target[r];
    if (!Prob && t == v.ignore_index) {  // zeros, without reading the logits
      auto zeros = [&](int64_t c, auto n) {
        constexpr int N = decltype(n)::value;
        A z[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) z[k] = A(0);
#pragma unroll
        for (int j = 0; j < N; ++j) store_vec(gxr + c + j * kStride, z);
      };
      walk(gxr, un.begin, un.end, element_aligned(gxr), lane, zeros, [&](int64_t c) { store1(gxr + c, A(0)); });
      continue;
    }
    if constexpr (!Prob) CUDA_KERNEL_ASSERT(t >= 0 && t < v.classes && "Target is out of bounds");
    const bool t_ok = !Prob && t >= 0 && t < v.classes;
    const Coefs<A> k = row_coefs<A, Prob>(a, r, t);
    const A shift = static_cast<const A*>(a.lse_parts)[2 * r], rel = static_cast<const A*>(a.lse_parts)[2 * r + 1];

    // The target's logit, saved for target_kernel before any lane overwrites it.
    if (t_ok && t >= un.begin && t < un.end) {
      if (lane == 0) static_cast<A*>(a.x_target)[r] = A(load1(xr + t));
      __syncwarp();
    }

    A others = 0;  // sum of p_c over this lane's classes other than the target
    // Gradient of one element without the target term; gy: d loss / d y_c.
    auto grad = [&](A x, A y, A wc, A& p, A& gy) {
      A slope;
      const A z = tf.z_and_slope(x, slope);
      p = exp_neg((z - shift) - rel);
      const A sub = Prob ? k.cw + k.cwy * y : k.cw;
      if constexpr (GradY) gy = k.cwy * wc * ((shift - z) + rel);
      return (p * k.cp - wc * sub) * slope;
    };
    auto vecs = [&](int64_t c, auto n) {
      constexpr int N = decltype(n)::value;
      A x[N * kVec], y[Prob ? N * kVec : 1], gx[N * kVec], gy[GradY ? N * kVec : 1];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        load_vec(xr + c + j * kStride, x + j * kVec);
        if constexpr (Prob) load_vec(yr + c + j * kStride, y + j * kVec);
      }
      // Slot of the target in this lane's batch, or -1 (rare: a branch, not a compare per element).
      const int64_t rel = t - c;
      const int hit = !Prob && rel >= 0 && rel < N * kStride && (rel & (kStride - 1)) < kVec
                          ? int(rel / kStride) * kVec + int(rel & (kStride - 1)) : -1;
      auto body = [&](auto with_target) {
#pragma unroll
        for (int i = 0; i < N * kVec; ++i) {
          const A wc = need_w ? w[c + (i / kVec) * kStride + i % kVec] : A(1);
          A p;
          gx[i] = grad(x[i], Prob ? y[i] : A(0), wc, p, gy[GradY ? i : 0]);
          if constexpr (!Prob) others += decltype(with_target)::value && i == hit ? A(0) : p;
        }
      };
      if (hit >= 0) body(std::true_type{}); else body(std::false_type{});
#pragma unroll
      for (int j = 0; j < N; ++j) {
        store_vec(gxr + c + j * kStride, gx + j * kVec);
        if constexpr (GradY) store_vec(gyr + c + j * kStride, gy + j * kVec);
      }
    };
    auto one = [&](int64_t c) {
      A p, gy = 0;
      const A y = Prob ? A(load1(yr + c)) : A(0);
      store1(gxr + c, grad(A(load1(xr + c)), y, need_w ? w[c] : A(1), p, gy));
      if constexpr (GradY) store1(gyr + c, gy);
      if (c != t) others += p;
    };
    const bool vec_ok = element_aligned(gxr) && same_alignment<T>(gxr, xr) &&
                        same_alignment<T>(gxr, yr) && same_alignment<T>(gxr, gyr);
    walk(gxr, un.begin, un.end, vec_ok, lane, vecs, one);
    if constexpr (!Prob) {
      others = warp_sum(others);
      if (lane == 0) static_cast<A*>(a.others)[u] = others;
    }
  }
}

// Class-index targets, after grad_kernel: the target's gradient of each row, one thread
// per row: p_t * coef_p - w_t * coef_w - coef_target with p_t - 1 = -sum_{c != t} p_c.
template <class T, bool Cap>
__global__ void __launch_bounds__(kThreads) target_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const Transform<A, Cap> tf(v);
  const A* w = static_cast<const A*>(v.weight);
  const bool need_w = w != nullptr && v.label_smoothing > 0;
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < v.rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = v.target[r];
    if (t == v.ignore_index || t < 0 || t >= v.classes) continue;  // grad_kernel asserted
    const Coefs<A> k = row_coefs<A, false>(a, r, t);
    const A* part = static_cast<const A*>(a.others) + r * v.chunks;
    A others = 0;
    for (int64_t j = 0; j < v.chunks; ++j) others += part[j];
    A slope;
    const A z = tf.z_and_slope(static_cast<const A*>(a.x_target)[r], slope);
    const A* parts = static_cast<const A*>(a.lse_parts) + 2 * r;
    const A p = exp_neg((z - parts[0]) - parts[1]);
    const A wc = need_w ? w[t] : A(1);
    store1(static_cast<T*>(a.gx) + r * a.gx_stride + t, (p * k.cp_minus_ct - others * k.ct - wc * k.cw) * slope);
  }
}

}  // namespace

void launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  const int64_t units = a.v.rows * a.v.chunks;
  if (units == 0) return;
  with_dtype(a.v.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_flag(a.v.y != nullptr, [&](auto prob) {
      with_flag(a.v.softcap > 0, [&](auto cap) {
        with_flag(a.gy != nullptr, [&](auto grad_y) {
          constexpr bool kProb = decltype(prob)::value, kCap = decltype(cap)::value;
          constexpr bool kGradY = decltype(grad_y)::value;
          if constexpr (kProb || !kGradY) {  // a target gradient needs probability targets
            if constexpr (kProb) {
              sum_wy_kernel<T><<<grid_for(a.v.rows, kWarpsPerBlock), kThreads, 0, stream>>>(a);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            lse_parts_kernel<T, kCap><<<grid_for(a.v.rows, kWarpsPerBlock), kThreads, 0, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            grad_kernel<T, kProb, kCap, kGradY><<<grid_for(units, kWarpsPerBlock), kThreads, 0, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            if constexpr (!kProb) {
              target_kernel<T, kCap><<<grid_for(a.v.rows, kThreads), kThreads, 0, stream>>>(a);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          }
        });
      });
    });
  });
}

}  // namespace fastce::cuda
