// Backward kernels: the gradient of the logits (and of probability targets) in one pass,
// recomputing softmax from the logits and the saved lse. The coefficients are the CPU backend's
// (rules.h: grad_coef), computed per row in double; in z-space the gradient of a row is
//   p_c * coef_p - w_c * (coef_w + coef_wy * y_c) - coef_target * [c == target],
// times dz/dx. As on the CPU, the main pass writes every class without the target term and the
// target's element is then written again with it.
#include "common.cuh"

namespace fastce::cuda {
namespace {

// An incoming value of the backward (see Values), at index i.
__device__ __forceinline__ double value_at(const Values& v, int64_t i, double absent) {
  if (v.data == nullptr) return absent;
  switch (v.dtype) {
    case Dtype::Float64: return static_cast<const double*>(v.data)[i];
    case Dtype::BFloat16: return double(load1(static_cast<const __nv_bfloat16*>(v.data) + i));
    case Dtype::Float16: return double(load1(static_cast<const __half*>(v.data) + i));
    default: return double(static_cast<const float*>(v.data)[i]);
  }
}

// Whether row r's lse is recomputed from the logits, as the CPU backend does for a huge row
// (see RowLse); a vocabulary slice's lse is the whole vocabulary's, kept as given.
__device__ __forceinline__ bool recomputes_lse(const BackwardArgs& a, int64_t r) {
  return a.v.opt.vocab_size < 0 && huge_lse(a.lse[r]);
}

// Row r's lse as given to the op: a vocabulary slice's as (shift, rel) pairs of the whole's.
__device__ __forceinline__ RowLse given_lse(const BackwardArgs& a, int64_t r) {
  return a.v.opt.vocab_size >= 0 ? split_lse(a.lse[2 * r], a.lse[2 * r + 1]) : RowLse{0.0, a.lse[r]};
}

// The gradient coefficients of row r (not ignored): rules.h's grad_coef, with the row's
// incoming gradients divided by the mean's divisors (rules.h: row_grads).
template <class A, bool Prob>
__device__ __forceinline__ GradCoef row_grad_coef(const BackwardArgs& a, int64_t r, const RowLse& l,
                                                  const RowTarget& t, double sum_wy) {
  const Rows& v = a.v;
  const A* w = static_cast<const A*>(v.weight);
  const int64_t i = v.opt.reduction == kNone ? r : 0;
  const Divisors div{value_at(a.total_weight, 0, 0.0), value_at(a.total_weight, 1, 0.0)};
  const RowGrads g = row_grads(value_at(a.grad_loss, i, 1.0), value_at(a.grad_zloss, i, 0.0), div, v.opt.reduction);
  const double w_r = t.local >= 0 && w != nullptr ? double(w[t.local]) : 1.0;
  const double V = double(vocabulary(v.opt, v.classes));
  const double weight_sum_all = v.opt.vocab_size >= 0 ? V : class_weight_sum(v);  // slices take no weights
  return grad_coef(l, g, Prob, w_r, t.local, v.opt.label_smoothing, V, weight_sum_all,
                   v.opt.lse_square_scale, sum_wy);
}

// A row's lse as two floats, hi + lo (as the CPU's piece_grad splits it): z - lse stays exact
// for large logits, and for a shifted row hi is its max and lo the log of its sum.
template <class A>
struct LseSplit {
  A hi, lo;
};
template <class A>
__device__ __forceinline__ LseSplit<A> split_lse(const GradCoef& k) {
  const bool shifted = k.lse_shift != 0.0;
  const A hi = shifted ? A(k.lse_shift) : A(k.lse);
  return {hi, A(shifted ? k.lse : k.lse - double(hi))};
}

// The target's gradient, with the coef_target term, evaluated in double from its logit x_t: the
// GPU's float exp carries up to 2 ulp, which on a confident row (1 - p_t ~ 1e-5) would be a
// percent of the target's gradient; one double exp per row (and an lse whose sum kept the
// small terms: Stats) leaves only the output's rounding.
template <class A, bool Cap>
__device__ double target_grad(const Transform<A, Cap>& tf, A x_t, double w_t, const GradCoef& k) {
  A slope;
  const A z = tf.z_and_slope(x_t, slope);
  const double p = exp((double(z) - k.lse_shift) - k.lse);
  return (p * k.coef_p - w_t * k.coef_w - k.coef_target) * double(slope);
}

// Probability targets: sum over the row of w_c * y_c (unsmoothed) by one warp, in a fixed
// order. All 32 lanes call it and get the sum.
template <class T, class A = acc_t<T>>
__device__ double row_sum_wy(const T* yr, const A* w, int64_t classes, int lane) {
  constexpr int kVec = Traits<T>::kVec;
  A acc = 0;
  auto vecs = [&](int64_t c, auto n) {
    constexpr int N = decltype(n)::value;
    A y[N * kVec];
#pragma unroll
    for (int j = 0; j < N; ++j) load_vec(yr + c + j * kWarp * kVec, y + j * kVec);
#pragma unroll
    for (int k = 0; k < N * kVec; ++k) acc += w != nullptr ? y[k] * w[c + (k / kVec) * kWarp * kVec + k % kVec] : y[k];
  };
  auto one = [&](int64_t c) { acc += A(load1(yr + c)) * (w != nullptr ? w[c] : A(1)); };
  walk(yr, 0, classes, element_aligned(yr), lane, vecs, one);
  return double(warp_sum(acc));
}

// A huge row's max and log-sum again from its logits, by one warp (all 32 lanes call it), for
// split rows (huge_lse_kernel) and whole rows (grad_kernel) alike. Such rows are rare: one
// vector per lane at a time, which keeps grad_kernel's registers those of its own loop.
template <class T, class A, bool Cap>
__device__ RowLse recompute_lse(const T* xr, const Transform<A, Cap>& tf, int64_t classes, int lane) {
  const SumsOf<A> none{nullptr, false, {A(1), A(0)}};  // the exponentials only
  Stats<A> st = lane_stats<false, 1>(xr, static_cast<const T*>(nullptr), tf, none, 0, classes, lane);
  warp_merge(st);
  return lse_of(st);
}

// Split rows only (an unsplit row's warp does this itself in grad_kernel): the probability
// targets' sum_wy of each row, one warp per row, before any piece needs it.
template <class T>
__global__ void __launch_bounds__(kThreads) sum_wy_kernel(const __grid_constant__ BackwardArgs a) {
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  for_each_warp_item(v.rows, [&](int64_t r) {
    const double s = row_sum_wy(static_cast<const T*>(v.y) + r * v.y_stride, static_cast<const acc_t<T>*>(v.weight),
                                v.classes, lane);
    if (lane == 0) a.sum_wy[r] = s;
  });
}

// Split rows only: rows whose lse is huge (recomputes_lse) get their max and log-sum again from
// the logits, one warp per row, before any piece's gradient is written (in place, over the
// logits).
template <class T, bool Cap>
__global__ void __launch_bounds__(kThreads) huge_lse_kernel(const __grid_constant__ BackwardArgs a) {
  using A = acc_t<T>;
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v.opt);
  for_each_warp_item(v.rows, [&](int64_t r) {
    if (ignored_row(v, r) || !recomputes_lse(a, r)) return;
    const RowLse l = recompute_lse(static_cast<const T*>(v.x) + r * v.x_stride, tf, v.classes, lane);
    if (lane == 0) a.huge_lse[r] = l;
  });
}

// Zeros over [b, e) of an ignored row's gradient, without reading the logits.
template <class T>
__device__ __forceinline__ void write_zeros(T* gxr, int64_t b, int64_t e, int lane) {
  using A = acc_t<T>;
  constexpr int kVec = Traits<T>::kVec;
  auto zeros = [&](int64_t c, auto n) {
    constexpr int N = decltype(n)::value;
    A z[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) z[k] = A(0);
#pragma unroll
    for (int j = 0; j < N; ++j) store_vec(gxr + c + j * kWarp * kVec, z);
  };
  walk(gxr, b, e, element_aligned(gxr), lane, zeros, [&](int64_t c) { store1(gxr + c, A(0)); });
}

// One warp per unit (row, or piece of a row). gx may be x itself (in-place backward): every
// element is read and then written by the same lane (both walked by x's alignment), and the
// target's logit is read by the whole warp before any lane writes.
// Blocks per SM that grad_kernel's register budget asks for: 3 (80 registers) for the
// language-model variants, whose rare paths (a huge row's lse, the narrow stores) would
// otherwise lift the whole kernel to 128 registers and 2 blocks; 2 (128 registers) for the
// probability-target and float64 variants (3 would spill their streaming loop; without a
// bound they take up to 168 registers, 1 block).
template <class T, bool Prob>
constexpr int grad_min_blocks() {
  return Prob || std::is_same_v<T, double> ? 2 : 3;
}

template <class T, bool Prob, bool Cap, bool GradY>
__global__ void __launch_bounds__(kThreads, grad_min_blocks<T, Prob>()) grad_kernel(const __grid_constant__ BackwardArgs a) {
  using A = acc_t<T>;
  constexpr int kVec = Traits<T>::kVec;
  constexpr int64_t kStride = kWarp * kVec;  // elements between a lane's vectors
  const Rows& v = a.v;
  const int lane = threadIdx.x % kWarp;
  const Transform<A, Cap> tf(v.opt);
  const A* w = static_cast<const A*>(v.weight);
  // Class weights enter only through coef_w (label smoothing) and coef_wy (targets).
  const bool need_w = w != nullptr && (Prob || v.opt.label_smoothing > 0);
  const int64_t units = v.rows * v.chunks;
  for_each_warp_item(units, [&](int64_t u) {
    const Unit un = unit_of(v, u);
    const int64_t r = un.row;
    const T* xr = static_cast<const T*>(v.x) + r * v.x_stride;
    const T* yr = Prob ? static_cast<const T*>(v.y) + r * v.y_stride : nullptr;
    T* gxr = static_cast<T*>(a.gx) + r * a.gx_stride;
    T* gyr = GradY ? static_cast<T*>(a.gy) + r * a.gy_stride : nullptr;
    const RowTarget t = Prob ? RowTarget{false, -1} : target_of(v, r);
    if (t.ignored) {
      write_zeros(gxr, un.begin, un.end, lane);
      return;
    }
    // A whole row's warp reads its targets' sum and recomputes a huge lse itself (all lanes
    // read the logits before any writes: warp_merge's shuffles); split rows' pieces take
    // them from sum_wy_kernel / huge_lse_kernel.
    const bool whole = v.chunks == 1;
    double sum_wy = 0.0;
    if constexpr (Prob) sum_wy = whole ? row_sum_wy(yr, w, v.classes, lane) : a.sum_wy[r];
    RowLse l = given_lse(a, r);
    if (recomputes_lse(a, r)) l = whole ? recompute_lse(xr, tf, v.classes, lane) : a.huge_lse[r];
    const GradCoef k = row_grad_coef<A, Prob>(a, r, l, t, sum_wy);
    const LseSplit<A> lse = split_lse<A>(k);
    const A cp = A(k.coef_p), cw = A(k.coef_w), cwy = A(k.coef_wy), cgy = A(k.coef_grad_y);

    // The target's gradient, from its logit read before any lane of the warp overwrites it.
    const bool target_here = t.local >= un.begin && t.local < un.end;
    double target_g = 0.0;
    if (target_here) {
      target_g = target_grad(tf, A(load1(xr + t.local)), w != nullptr ? double(w[t.local]) : 1.0, k);
      __syncwarp();
    }

    // The gradient of one element without the target term; gy: d loss / d y_c.
    auto grad = [&](A x, A y, A wc, A& gy) {
      A slope;
      const A z = tf.z_and_slope(x, slope);
      const A p = exp_neg((z - lse.hi) - lse.lo);
      const A sub = Prob ? cw + cwy * y : cw;
      if constexpr (GradY) gy = cgy * wc * ((lse.hi - z) + lse.lo);
      return (p * cp - wc * sub) * slope;
    };
    // Vectors are placed by the logits' alignment; targets and gradients whose rows do not
    // share it (a contiguous gradient of x = buf[:, :V]) are read and written at their
    // vec_width: narrower accesses of the same bytes, never the scalar path.
    const int wy = vec_width(xr, yr), wgx = vec_width(xr, gxr), wgy = vec_width(xr, gyr);
    auto run = [&](auto narrow) {
      constexpr bool kNarrow = decltype(narrow)::value;
      auto vecs = [&](int64_t c, auto n) {
        constexpr int N = decltype(n)::value;
        A x[N * kVec], y[Prob ? N * kVec : 1], gx[N * kVec], gy[GradY ? N * kVec : 1];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          load_vec(xr + c + j * kStride, x + j * kVec);
          if constexpr (Prob) load_vec(yr + c + j * kStride, y + j * kVec, kNarrow ? wy : 16);
        }
#pragma unroll
        for (int i = 0; i < N * kVec; ++i) {
          const A wc = need_w ? w[c + (i / kVec) * kStride + i % kVec] : A(1);
          gx[i] = grad(x[i], Prob ? y[i] : A(0), wc, gy[GradY ? i : 0]);
        }
#pragma unroll
        for (int j = 0; j < N; ++j) {
          store_vec(gxr + c + j * kStride, gx + j * kVec, kNarrow ? wgx : 16);
          if constexpr (GradY) store_vec(gyr + c + j * kStride, gy + j * kVec, kNarrow ? wgy : 16);
        }
      };
      auto one = [&](int64_t c) {
        A gy = 0;
        const A y = Prob ? A(load1(yr + c)) : A(0);
        store1(gxr + c, grad(A(load1(xr + c)), y, need_w ? w[c] : A(1), gy));
        if constexpr (GradY) store1(gyr + c, gy);
      };
      const bool vec_ok = element_aligned(xr) && element_aligned(yr) && element_aligned(gxr) && element_aligned(gyr);
      walk(xr, un.begin, un.end, vec_ok, lane, vecs, one);
    };
    if (wy == 16 && wgx == 16 && wgy == 16) run(Aligned{}); else run(Narrow{});

    if (target_here) {  // after every lane's writes (__syncwarp orders them)
      __syncwarp();
      if (lane == 0) store_double(gxr + t.local, target_g);
    }
  });
}

}  // namespace

void launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  const int64_t units = a.v.rows * a.v.chunks;
  if (units == 0) return;
  with_dtype(a.v.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_flag(a.v.y != nullptr, [&](auto prob) {
      with_flag(a.v.opt.softcap > 0, [&](auto cap) {
        with_flag(a.gy != nullptr, [&](auto grad_y) {
          constexpr bool kProb = decltype(prob)::value, kCap = decltype(cap)::value;
          constexpr bool kGradY = decltype(grad_y)::value;
          if constexpr (kProb || !kGradY) {  // a target gradient needs probability targets
            const unsigned row_blocks = grid_for(a.v.rows, kWarpsPerBlock);
            const bool split = a.v.chunks > 1;  // else grad_kernel's warps do both themselves
            if (kProb && split) {
              sum_wy_kernel<T><<<row_blocks, kThreads, 0, stream>>>(a);
              FASTCE_LAUNCH_CHECK();
            }
            if (split && a.v.opt.vocab_size < 0) {
              huge_lse_kernel<T, kCap><<<row_blocks, kThreads, 0, stream>>>(a);
              FASTCE_LAUNCH_CHECK();
            }
            grad_kernel<T, kProb, kCap, kGradY><<<grid_for(units, kWarpsPerBlock), kThreads, 0, stream>>>(a);
            FASTCE_LAUNCH_CHECK();
          }
        });
      });
    });
  });
}

}  // namespace fastce::cuda
