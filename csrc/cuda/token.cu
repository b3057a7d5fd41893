// The token ops' kernels (fastce.token_logprobs, fastce.entropy): one warp per row, as the loss
// kernels. Forward: each lane folds its share of the row (16-byte loads, walk()) into running
// statistics (max, sum exp(z - m), sum exp(z - m)(z - m)), a butterfly merges the lanes' with
// rules.h's merge_token_stats, then the lanes gather the K chosen tokens. Backward: each lane
// writes its share of token_grad_shared(...) * dz/dx, then the chosen tokens' one-hot parts.
#include "common.cuh"
#include "token_launch.h"

namespace fastce::cuda {
namespace {

enum Form { kIdentity = 0, kScale = 1, kCap = 2 };

// rules.h's token transform (logit_scale, softcap, / temperature) in one form per kernel.
template <class A, int F>
struct TokenTransform {
  LogitTransform<A> t;
  __device__ explicit TokenTransform(const TokenOptions& o) : t(token_transform<A>(o)) {}
  __device__ __forceinline__ A z(A x) const {
    if constexpr (F == kCap) return capped_z(t, x);
    else if constexpr (F == kScale) return scaled_z(t, x);
    else return x;
  }
  __device__ __forceinline__ A z_and_slope(A x, A& slope) const {
    if constexpr (F == kCap) return capped_z_slope(t, x, slope);
    slope = F == kScale ? t.scale : A(1);
    return z(x);
  }
};

// A lane's running statistics, relative to its max m (see rules.h: TokenStats), and the index
// of its first NaN, else of its first largest z (a lane visits its elements in order).
template <class A>
struct LaneStats {
  A m = -INFINITY, s = 0, ed = 0;
  bool nan = false;
  int64_t arg = -1;
};

// Folds N transformed logits: one max, one rescale, one exp each. index(k): z[k]'s class.
template <int N, bool Entropy, bool Argmax, class A, class Index>
__device__ __forceinline__ void fold(LaneStats<A>& st, const A* z, Index index) {
  if constexpr (Argmax) {
    A best = st.m;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (z[k] != z[k]) {
        if (!st.nan) st.arg = index(k);
        st.nan = true;
      } else if (!st.nan && (st.arg < 0 || z[k] > best)) {
        best = z[k];
        st.arg = index(k);
      }
    }
  }
  A m = st.m;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    st.nan |= z[k] != z[k];
    m = max_acc(m, z[k]);
  }
  if (m == -INFINITY) return;  // nothing but -inf (and NaN, flagged): no mass
  if (m != st.m) {
    if (st.m != -INFINITY) {  // rebase: exp(z - m_old) gains alpha, (z - m_old) gains d
      const A d = st.m - m, alpha = exp_neg(d);
      st.ed = alpha * (st.ed + d * st.s);
      st.s = alpha * st.s;
    }
    st.m = m;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A d = z[k] - m, e = exp_neg(d);
    st.s += e;
    if constexpr (Entropy) st.ed += e == A(0) ? A(0) : e * d;  // a masked class adds nothing
  }
}

__device__ __forceinline__ TokenStats shfl_stats(const TokenStats& s, int off) {
  TokenStats o;
  o.max = shfl_xor(s.max, off);
  o.sumexp = shfl_xor(s.sumexp, off);
  o.sum_ed = shfl_xor(s.sum_ed, off);
  o.has_nan = shfl_xor(int(s.has_nan), off) != 0;
  o.argmax = shfl_xor(static_cast<long long>(s.argmax), off);
  return o;
}

// The row's statistics in every lane (a butterfly of merge_token_stats: commutative, so both
// lanes of a pair hold the same values).
template <class A>
__device__ __forceinline__ TokenStats warp_token_stats(const LaneStats<A>& lane) {
  TokenStats st;
  st.has_nan = lane.nan;
  st.argmax = lane.arg;
  if (lane.m != -INFINITY) {
    st.max = double(lane.m);
    st.sumexp = double(lane.s);
    st.sum_ed = double(lane.ed);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const TokenStats o = shfl_stats(st, off);
    merge_token_stats(st, o);
  }
  return st;
}

__device__ __forceinline__ int64_t row_offset(const TokenRows& v, int64_t r) {
  int64_t offset = 0;
  for (int d = v.lead - 1; d >= 0; --d) {
    const int64_t i = r % v.sizes[d];
    r /= v.sizes[d];
    offset += i * v.strides[d];
  }
  return offset;
}

__device__ __forceinline__ int64_t chosen(const TokenRows& v, int64_t r, int64_t j) {
  const int64_t c = v.index[r * v.K + j];
  FASTCE_KERNEL_ASSERT(c >= 0 && c < v.classes && "index is out of bounds");
  return c >= 0 && c < v.classes ? c : 0;  // (asserts compiled out: read nothing out of bounds)
}

template <class T, int F, bool Entropy, bool Argmax>
__global__ void __launch_bounds__(kThreads) token_forward_kernel(TokenForwardArgs a) {
  using A = acc_t<T>;
  constexpr int kVec = Traits<T>::kVec;
  const TokenRows& v = a.v;
  const TokenTransform<A, F> tf(v.opt);
  const int lane = threadIdx.x % kWarp;
  for_each_warp_item(v.rows, [&](int64_t r) {
    const T* xr = static_cast<const T*>(v.x) + row_offset(v, r);
    LaneStats<A> st;
    auto vecs = [&](int64_t c, auto n) {
      constexpr int N = decltype(n)::value;
      A z[N * kVec];
#pragma unroll
      for (int j = 0; j < N; ++j) load_vec(xr + c + j * kWarp * kVec, z + j * kVec);
#pragma unroll
      for (int k = 0; k < N * kVec; ++k) z[k] = tf.z(z[k]);
      fold<N * kVec, Entropy, Argmax>(st, z, [&](int k) { return c + (k / kVec) * kWarp * kVec + k % kVec; });
    };
    auto one = [&](int64_t c) {
      const A z[1] = {tf.z(A(load1(xr + c)))};
      fold<1, Entropy, Argmax>(st, z, [&](int) { return c; });
    };
    walk(xr, 0, v.classes, element_aligned(xr), lane, vecs, one);
    const TokenStats row = warp_token_stats(st);
    const double lse = token_lse(row);
    if (lane == 0) {
      a.lse[r] = lse;
      if (Entropy) static_cast<A*>(a.entropy)[r] = A(token_entropy(row));
      if (Argmax) a.argmax[r] = row.argmax;
    }
    for (int64_t j = lane; j < v.K; j += kWarp) {
      const A z = tf.z(A(load1(xr + chosen(v, r, j))));
      static_cast<A*>(a.logprobs)[r * v.K + j] = A(token_logprob(double(z), lse));
    }
  });
}

// lse = hi + lo: z - lse stays exact in float for large logits.
template <class A>
struct SplitLse {
  A hi, lo;
  __device__ explicit SplitLse(double lse) : hi(A(lse)), lo(A(lse - double(A(lse)))) {}
};

template <class T, int F>
__global__ void __launch_bounds__(kThreads) token_backward_kernel(TokenBackwardArgs a) {
  using A = acc_t<T>;
  constexpr int kVec = Traits<T>::kVec;
  const TokenRows& v = a.v;
  const TokenTransform<A, F> tf(v.opt);
  const int lane = threadIdx.x % kWarp;
  for_each_warp_item(v.rows, [&](int64_t r) {
    const T* xr = static_cast<const T*>(v.x) + row_offset(v, r);
    T* gr = static_cast<T*>(a.gx) + r * v.classes;
    double g_sum = 0.0;
    for (int64_t j = lane; a.grad_logprobs && j < v.K; j += kWarp) g_sum += a.grad_logprobs[r * v.K + j];
    g_sum = warp_sum(g_sum);
    const double g_h = a.grad_entropy ? a.grad_entropy[r] : 0.0;
    const double mean_z = g_h != 0.0 ? token_mean_z(a.lse[r], a.entropy[r]) : 0.0;
    const SplitLse<A> lse(a.lse[r]);
    const A gs = A(g_sum), gh = A(g_h), mz = A(mean_z);
    auto grad_of = [&](A x) {
      A slope;
      const A z = tf.z_and_slope(x, slope);
      const A p = exp_neg((z - lse.hi) - lse.lo);
      return token_grad_shared(p, z, gs, gh, mz) * slope;
    };
    auto vecs = [&](int64_t c, auto n) {
      constexpr int N = decltype(n)::value;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        A x[kVec];
        load_vec(xr + c + j * kWarp * kVec, x);
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[k] = grad_of(x[k]);
        store_vec(gr + c + j * kWarp * kVec, x);
      }
    };
    auto one = [&](int64_t c) { store1(gr + c, grad_of(A(load1(xr + c)))); };
    walk(xr, 0, v.classes, element_aligned(xr) && same_alignment<T>(xr, gr), lane, vecs, one);
    __syncwarp();  // the row's shared part is written: the chosen tokens' values replace theirs
    for (int64_t j = lane; a.grad_logprobs && j < v.K; j += kWarp) {
      const int64_t c = chosen(v, r, j);
      double onehot = 0.0;  // the same token chosen several times gets every share
      for (int64_t i = 0; i < v.K; ++i) onehot += chosen(v, r, i) == c ? a.grad_logprobs[r * v.K + i] : 0.0;
      A slope;
      const A z = tf.z_and_slope(A(load1(xr + c)), slope);
      const A p = exp_neg((z - lse.hi) - lse.lo);
      store1(gr + c, (token_grad_shared(p, z, gs, gh, mz) + A(onehot)) * slope);
    }
  });
}

template <class F>
void with_form(const TokenOptions& o, F&& f) {
  if (o.softcap > 0) f(std::integral_constant<int, kCap>{});
  else if (!token_identity(o)) f(std::integral_constant<int, kScale>{});
  else f(std::integral_constant<int, kIdentity>{});
}

}  // namespace

void launch_token_forward(const TokenForwardArgs& a, cudaStream_t stream) {
  if (a.v.rows == 0) return;
  const unsigned grid = grid_for(a.v.rows, kWarpsPerBlock);
  with_dtype(a.v.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_form(a.v.opt, [&](auto form) {
      with_flag(a.entropy != nullptr, [&](auto entropy) {
        with_flag(a.argmax != nullptr, [&](auto argmax) {
          token_forward_kernel<T, form.value, entropy.value, argmax.value><<<grid, kThreads, 0, stream>>>(a);
          FASTCE_LAUNCH_CHECK();
        });
      });
    });
  });
}

void launch_token_backward(const TokenBackwardArgs& a, cudaStream_t stream) {
  if (a.v.rows == 0) return;
  const unsigned grid = grid_for(a.v.rows, kWarpsPerBlock);
  with_dtype(a.v.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_form(a.v.opt, [&](auto form) {
      token_backward_kernel<T, form.value><<<grid, kThreads, 0, stream>>>(a);
      FASTCE_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastce::cuda
