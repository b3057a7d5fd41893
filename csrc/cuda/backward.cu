// Backward kernels: the gradient of the logits (and of probability targets) in one
// pass, recomputing softmax from the logits and the saved lse. The math is the CPU
// backend's (csrc/cpu/row_kernels.h, GradCoef): in z-space the gradient of one row is
//   p_c * coef_p - w_c * (coef_w + coef_wy * y_c)  - coef_target at the target class,
// times dz/dx. The per-row coefficients fold in the incoming gradient, the reduction,
// label smoothing and the z-loss.
#include "common.cuh"

namespace fastce::cuda {
namespace {

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

// One warp per unit (row, or piece of a row). gx may be x itself (in-place backward):
// every element is read and then written by the same lane, and the target's logit is
// read before any lane writes (see the __syncwarp below).
template <class T, bool Prob, bool Cap, bool GradY>
__global__ void __launch_bounds__(kThreads) grad_kernel(const BackwardArgs a) {
  using A = acc_t<T>;
  constexpr int kVec = Traits<T>::kVec;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v);
  const A* w = static_cast<const A*>(v.weight);
  const A* gl = static_cast<const A*>(a.grad_loss);
  const A* gzl = static_cast<const A*>(a.grad_zloss);
  const bool per_row = a.reduction == 0;
  const double eps = v.label_smoothing, C = double(v.classes), sq = v.lse_square_scale;
  const double div = a.reduction == 1 ? double(*static_cast<const A*>(a.total_weight)) : 1.0;
  const double ws = eps > 0 && w != nullptr ? *v.weight_sum : C;
  const double smooth = eps > 0 ? eps / C * ws : 0.0;
  // Class weights enter only through coef_w (label smoothing) and coef_wy (targets).
  const bool need_w = w != nullptr && (Prob || eps > 0);
  const int64_t units = v.rows * v.chunks;
  for (int64_t u = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; u < units;
       u += int64_t(gridDim.x) * kWarpsPerBlock) {
    const Unit un = unit_of(v, u);
    const int64_t r = un.row;
    const T* xr = static_cast<const T*>(v.x) + r * v.x_stride;
    const T* yr = Prob ? static_cast<const T*>(v.y) + r * v.y_stride : nullptr;
    T* gxr = static_cast<T*>(a.gx) + r * a.gx_stride;
    T* gyr = GradY ? static_cast<T*>(a.gy) + r * a.gy_stride : nullptr;
    const bool vec_ok = element_aligned(gxr) && same_alignment<T>(gxr, xr) &&
                        same_alignment<T>(gxr, yr) && same_alignment<T>(gxr, gyr);
    const int64_t t = Prob ? -1 : v.target[r];
    if (!Prob && t == v.ignore_index) {  // zeros, without reading the logits
      auto zeros = [&](int64_t c, auto n) {
        constexpr int N = decltype(n)::value;
        A z[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) z[k] = A(0);
#pragma unroll
        for (int j = 0; j < N; ++j) store_vec(gxr + c + j * kWarp * kVec, z);
      };
      walk(gxr, un.begin, un.end, element_aligned(gxr), lane, zeros, [&](int64_t c) { store1(gxr + c, A(0)); });
      continue;
    }

    const double g = double(gl[per_row ? r : 0]) / div;
    const double g_z = double(gzl[per_row ? r : 0]) / div;
    const double lse_d = double(static_cast<const A*>(a.lse)[r]);
    const bool t_ok = !Prob && t >= 0 && t < v.classes;
    if constexpr (!Prob) CUDA_KERNEL_ASSERT(t >= 0 && t < v.classes && "Target is out of bounds");
    const double w_r = t_ok && w != nullptr ? double(w[t]) : 1.0;
    double coef_p;
    if constexpr (Prob) {
      const double swy = double(static_cast<const A*>(a.sum_wy)[r]);
      coef_p = g * ((1.0 - eps) * swy + smooth) + 2.0 * sq * lse_d * (g + g_z);
    } else {
      coef_p = g * ((1.0 - eps) * w_r + smooth) + 2.0 * sq * w_r * lse_d * (g + g_z);
    }
    const A lse = A(lse_d), cp = A(coef_p), cw = A(eps > 0 ? g * eps / C : 0.0);
    const A cwy = A(g * (1.0 - eps));  // coef_wy and coef_grad_y (probability targets)

    // Gradient of one element (extra: the target term); gy: d loss / d y_c.
    auto grad = [&](A x, A y, A wc, A extra, A& gy) {
      A slope;
      const A z = tf.z_and_slope(x, slope);
      const A p = exp_neg(z - lse);
      const A sub = Prob ? cw + cwy * y : cw;
      if constexpr (GradY) gy = cwy * wc * (lse - z);
      return (p * cp - wc * sub - extra) * slope;
    };

    // The target's logit, read before any lane of the warp overwrites it.
    const bool has_target = t_ok && t >= un.begin && t < un.end;
    A x_t = 0;
    if (has_target) {
      if (lane == 0) x_t = A(load1(xr + t));
      __syncwarp();
    }

    auto vecs = [&](int64_t c, auto n) {
      constexpr int N = decltype(n)::value;
      A x[N * kVec], y[Prob ? N * kVec : 1], gx[N * kVec], gy[GradY ? N * kVec : 1];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        load_vec(xr + c + j * kWarp * kVec, x + j * kVec);
        if constexpr (Prob) load_vec(yr + c + j * kWarp * kVec, y + j * kVec);
      }
#pragma unroll
      for (int k = 0; k < N * kVec; ++k) {
        const A wc = need_w ? w[c + (k / kVec) * kWarp * kVec + k % kVec] : A(1);
        gx[k] = grad(x[k], Prob ? y[k] : A(0), wc, A(0), gy[GradY ? k : 0]);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        store_vec(gxr + c + j * kWarp * kVec, gx + j * kVec);
        if constexpr (GradY) store_vec(gyr + c + j * kWarp * kVec, gy + j * kVec);
      }
    };
    auto one = [&](int64_t c) {
      A gy = 0;
      const A y = Prob ? A(load1(yr + c)) : A(0);
      store1(gxr + c, grad(A(load1(xr + c)), y, need_w ? w[c] : A(1), A(0), gy));
      if constexpr (GradY) store1(gyr + c, gy);
    };
    walk(gxr, un.begin, un.end, vec_ok, lane, vecs, one);

    if (has_target) {  // the target term, over the value the walk wrote
      __syncwarp();
      if (lane == 0) {
        A gy = 0;
        const A coef_target = A(g * (1.0 - eps) * w_r);
        store1(gxr + t, grad(x_t, A(0), need_w ? w[t] : A(1), coef_target, gy));
      }
    }
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
            grad_kernel<T, kProb, kCap, kGradY><<<grid_for(units, kWarpsPerBlock), kThreads, 0, stream>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
      });
    });
  });
}

}  // namespace fastce::cuda
