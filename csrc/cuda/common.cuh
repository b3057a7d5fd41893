// Device helpers shared by the forward and backward kernels: dtype traits with
// 16-byte vector loads/stores, the logit transform, online-softmax statistics with
// warp butterflies, and the walk over one row piece that vectorizes whatever can be.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launch.h"

namespace fastce::cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // several rows (or row pieces) per block
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kBatch = 4;          // 16-byte vectors in flight per lane per step
constexpr unsigned kFull = 0xffffffffu;

// ---- dtypes -------------------------------------------------------------------------
// Acc: accumulation type; kVec: elements per 16-byte vector.
template <class T> struct Traits { using Acc = float; static constexpr int kVec = 16 / sizeof(T); };
template <> struct Traits<double> { using Acc = double; static constexpr int kVec = 2; };
template <class T> using acc_t = typename Traits<T>::Acc;

__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ double load1(const double* p) { return *p; }
__device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load1(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(double* p, double v) { *p = v; }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }

// One 16-byte vector at p (16-byte aligned) into out[0, kVec).
__device__ __forceinline__ void load_vec(const float* p, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
__device__ __forceinline__ void load_vec(const double* p, double* out) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  out[0] = v.x; out[1] = v.y;
}
__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> float is a 16-bit shift, exact
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load_vec(const __half* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    static_assert(sizeof(h) == 4, "half2 is 4 bytes");
    memcpy(&h, &w[i], 4);
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store_vec(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_vec(double* p, const double* v) {
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
}
__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float* v) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);  // .x is the low half
    memcpy(&w[i], &h, 4);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void store_vec(__half* p, const float* v) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    memcpy(&w[i], &h, 4);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Output of a reduced result (computed in double) in the input's dtype.
template <class T> __device__ __forceinline__ T from_double(double v);
template <> __device__ __forceinline__ float from_double<float>(double v) { return float(v); }
template <> __device__ __forceinline__ double from_double<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_double<__half>(double v) { return __double2half(v); }

// ---- math -------------------------------------------------------------------------------
// exp(d) for d <= 0 (d = z - max or z - lse). exp2 of d*log2(e) is one MUFU op; rounding
// d*log2(e) costs a relative error of 2^-24 * |d| * 1.44 in the result, negligible where
// the terms matter (d near 0). NaN stays NaN, -inf gives 0.
__device__ __forceinline__ float exp_neg(float d) { return exp2f(d * 1.4426950408889634f); }
__device__ __forceinline__ double exp_neg(double d) { return exp(d); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }  // ignores NaN
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float tanh_acc(float v) { return tanhf(v); }
// Products that the compiler may not fuse into an FMA (keeps merge() symmetric).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double tanh_acc(double v) { return tanh(v); }

// z = logit_scale * x, soft-capped when Cap: z = softcap * tanh(logit_scale * x / softcap).
template <class A, bool Cap>
struct Transform {
  A scale, cap, u_coef;
  __device__ explicit Transform(const Rows& v)
      : scale(A(v.logit_scale)), cap(A(v.softcap)),
        u_coef(v.softcap > 0 ? A(v.logit_scale / v.softcap) : A(0)) {}
  __device__ __forceinline__ A z(A x) const {
    if constexpr (Cap) return tanh_acc(x * u_coef) * cap; else return x * scale;
  }
  __device__ __forceinline__ A z_and_slope(A x, A& slope) const {  // slope = dz/dx
    if constexpr (Cap) {
      const A t = tanh_acc(x * u_coef);
      slope = (A(1) - t * t) * scale;
      return t * cap;
    } else {
      slope = scale;
      return x * scale;
    }
  }
};

// ---- online softmax statistics ------------------------------------------------------------
// max of z (NaN ignored) and sum of exp(z - max); a NaN logit makes s NaN, which
// propagates through every merge to the lse. Plus the linear sums the loss needs.
template <class A>
struct Stats {
  A m = -INFINITY, s = 0, wz = 0, wyz = 0, wy = 0;
};

// Folds b into a. Commutative bit for bit (fmax, sums and products of the same two
// terms), so both lanes of a butterfly end up with identical values.
template <class A>
__device__ __forceinline__ void merge(Stats<A>& a, const Stats<A>& b) {
  const A m = max_acc(a.m, b.m);
  const A base = m == -INFINITY ? A(0) : m;  // all -inf so far: avoid -inf - -inf
  a.s = mul_rn(a.s, exp_neg(a.m - base)) + mul_rn(b.s, exp_neg(b.m - base));
  a.m = m;
  a.wz += b.wz;
  a.wyz += b.wyz;
  a.wy += b.wy;
}

template <class A>
__device__ __forceinline__ A shfl_xor(A v, int mask) { return __shfl_xor_sync(kFull, v, mask); }

// Butterfly over the warp: every lane ends with the statistics of the whole warp, in an
// order fixed by the lane numbering (deterministic). All 32 lanes must call it.
template <class A>
__device__ __forceinline__ void warp_merge(Stats<A>& st) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    Stats<A> o;
    o.m = shfl_xor(st.m, off);
    o.s = shfl_xor(st.s, off);
    o.wz = shfl_xor(st.wz, off);
    o.wyz = shfl_xor(st.wyz, off);
    o.wy = shfl_xor(st.wy, off);
    merge(st, o);
  }
}

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += shfl_xor(v, off);
  return v;
}

// ---- walking one row piece ------------------------------------------------------------
__device__ __forceinline__ int mod16(const void* p) { return int(reinterpret_cast<uintptr_t>(p) & 15); }

// Walks the elements [b, e) of a row with the 32 lanes of a warp. `anchor` is the row
// start of the array that decides alignment; every other array the callbacks touch must
// have the same address mod 16 at element b (checked by the caller through vec_ok).
// Elements before the first 16-byte boundary and after the last whole vector go one by
// one to one(c); the aligned middle goes to vecs(c, N): N vectors of kVec elements at
// c + j * 32 * kVec (j < N), kBatch at a time while there are enough, then singly.
// Without vec_ok every element goes to one(c). Lanes may finish at different times:
// the callbacks must not use warp collectives.
template <class T, class Vecs, class One>
__device__ __forceinline__ void walk(const T* anchor, int64_t b, int64_t e, bool vec_ok, int lane,
                                     Vecs&& vecs, One&& one) {
  constexpr int kVec = Traits<T>::kVec;
  const int64_t n = e - b;
  int64_t head = n, nvec = 0;
  if (vec_ok) {
    const int mis = mod16(anchor + b);
    head = mis == 0 ? 0 : (16 - mis) / int64_t(sizeof(T));
    head = head < n ? head : n;
    nvec = (n - head) / kVec;
  }
  for (int64_t i = lane; i < head; i += kWarp) one(b + i);
  const int64_t body = b + head;
  int64_t v = lane;
  for (; v + (kBatch - 1) * kWarp < nvec; v += kBatch * kWarp)
    vecs(body + v * kVec, std::integral_constant<int, kBatch>{});
  for (; v < nvec; v += kWarp) vecs(body + v * kVec, std::integral_constant<int, 1>{});
  for (int64_t c = body + nvec * kVec + lane; c < e; c += kWarp) one(c);
}

// Whether pointers that walk() will touch at the same element index share the anchor's
// alignment (and are aligned to their element size, which vector access assumes).
template <class T>
__device__ __forceinline__ bool same_alignment(const T* anchor, const T* other) {
  return other == nullptr || mod16(other) == mod16(anchor);
}
template <class T>
__device__ __forceinline__ bool element_aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(T)) == 0;
}

// Folds K logits (transformed in place into z) and their targets into st: one max
// over the batch, one rescale of the running sum, one exp per element.
template <int K, bool Prob, bool Cap, class A, class Index>
__device__ __forceinline__ void accumulate(Stats<A>& st, A* z, const A* y, const Transform<A, Cap>& tf,
                                           const A* w, bool need_wz, Index index) {
  A m = st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    z[k] = tf.z(z[k]);
    m = max_acc(m, z[k]);
  }
  const A base = m == -INFINITY ? A(0) : m;
  A s = st.s * exp_neg(st.m - base);
#pragma unroll
  for (int k = 0; k < K; ++k) s += exp_neg(z[k] - base);
  st.s = s;
  st.m = m;
  if (Prob || need_wz) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A wk = w != nullptr ? w[index(k)] : A(1);
      if (need_wz) st.wz += wk * z[k];
      if constexpr (Prob) {
        const A yw = y[k] * wk;
        st.wyz += yw * z[k];
        st.wy += yw;
      }
    }
  }
}

// This lane's statistics of x[b, e) of one row (y: its probability targets, or nullptr);
// warp_merge combines the lanes'.
template <bool Prob, class T, class A, bool Cap>
__device__ __forceinline__ Stats<A> lane_stats(const T* xr, const T* yr, const Transform<A, Cap>& tf, const A* w,
                                               bool need_wz, int64_t b, int64_t e, int lane) {
  constexpr int kVec = Traits<T>::kVec;
  Stats<A> st;
  auto vecs = [&](int64_t c, auto n) {
    constexpr int N = decltype(n)::value;
    A z[N * kVec], y[Prob ? N * kVec : 1];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      load_vec(xr + c + j * kWarp * kVec, z + j * kVec);
      if constexpr (Prob) load_vec(yr + c + j * kWarp * kVec, y + j * kVec);
    }
    accumulate<N * kVec, Prob>(st, z, y, tf, w, need_wz,
                               [&](int k) { return c + (k / kVec) * kWarp * kVec + k % kVec; });
  };
  auto one = [&](int64_t c) {
    A z[1] = {A(load1(xr + c))}, y[1] = {A(0)};
    if constexpr (Prob) y[0] = A(load1(yr + c));
    accumulate<1, Prob>(st, z, y, tf, w, need_wz, [&](int) { return c; });
  };
  walk(xr, b, e, element_aligned(xr) && same_alignment(xr, yr), lane, vecs, one);
  return st;
}

// A row's lse is kept as shift + rel: normally the float64 lse split in two floats; where |lse|
// reaches 2^19 (a row masked with finfo.min, ties at 1e30) float64's own spacing starts to show
// (as on the CPU: csrc/cpu/cross_entropy_cpu.cpp, RowLse), so such a row has shift = its max
// and rel = the log of its sum (the backward recomputes them from the logits), and
// z - lse = (z - shift) - rel stays exact.
constexpr double kHugeLse = 524288.0;  // 2^19
__device__ __forceinline__ bool huge_lse(double lse) { return fabs(lse) >= kHugeLse && fabs(lse) < INFINITY; }

// Grid-stride loop over work units (one per warp): unit = row * chunks + piece.
struct Unit {
  int64_t row, begin, end;
};
__device__ __forceinline__ Unit unit_of(const Rows& v, int64_t u) {
  const int64_t r = u / v.chunks, k = u - r * v.chunks;
  const int64_t b = k * v.chunk;
  const int64_t e = b + v.chunk < v.classes ? b + v.chunk : v.classes;
  return {r, b, e};
}

inline unsigned grid_for(int64_t units, int per_block) {
  const int64_t blocks = (units + per_block - 1) / per_block;
  return unsigned(blocks < (int64_t(1) << 30) ? (blocks > 0 ? blocks : 1) : (int64_t(1) << 30));
}

// Dispatch helpers: Dtype -> element type, runtime bool -> compile-time bool.
template <class F>
void with_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::Float64: f(static_cast<double*>(nullptr)); break;
    case Dtype::BFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case Dtype::Float16: f(static_cast<__half*>(nullptr)); break;
    default: f(static_cast<float*>(nullptr)); break;
  }
}
template <class F>
void with_flag(bool v, F&& f) {
  if (v) f(std::true_type{}); else f(std::false_type{});
}

}  // namespace fastce::cuda
