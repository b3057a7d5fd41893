// Device helpers shared by the forward and backward kernels: dtype traits with 16-byte vector
// loads/stores, the logit transform (rules.h), online-softmax statistics with warp butterflies,
// the walk over one row piece that vectorizes whatever can be, and where a row's target lies.
// The loss and gradient formulas themselves are rules.h's, the CPU backend's.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "launch.h"

// A failed check in a kernel is a device-side assert, as in torch's own kernels ("device-side
// assert triggered"); always compiled in (NDEBUG does not remove it). The emulation
// (tests/cuda_emulation) defines its own first.
#ifndef FASTCE_KERNEL_ASSERT
#include <cassert>
#ifdef NDEBUG  // then <cassert> declares no __assert_fail: glibc's declaration, on the device too
extern "C" {
#ifdef __CUDA_ARCH__
__host__ __device__
#endif
void __assert_fail(const char* assertion, const char* file, unsigned int line, const char* function) noexcept
    __attribute__((__noreturn__));
}
#endif
#define FASTCE_KERNEL_ASSERT(cond)                                                   \
  do {                                                                               \
    if (!(cond)) __assert_fail(#cond, __FILE__, static_cast<unsigned>(__LINE__), __func__); \
  } while (0)
#endif
// After each launch: a launch that failed (bad configuration, no device) throws.
#ifndef FASTCE_LAUNCH_CHECK
#define FASTCE_LAUNCH_CHECK() ::fastce::cuda::check_launch(cudaGetLastError())
#endif

namespace fastce::cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // several rows (or row pieces) per block
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kBatch = 4;          // 16-byte vectors in flight per lane per step
constexpr unsigned kFull = 0xffffffffu;

inline void check_launch(cudaError_t e) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fastce: CUDA kernel launch failed: ") + cudaGetErrorString(e));
}

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

// ---- 16-byte vectors ------------------------------------------------------------------
// A vector is moved as 16 bytes (uint4) and converted between bits and acc values by Codec<T>.
// Its address is 16-byte aligned (one 128-bit access) or, where an array's rows do not share
// the anchor's alignment (walk()), `width`-aligned (16/width narrower accesses of the same
// bytes): a row is never pushed to scalar accesses by a second array's misalignment.
// Under the emulation every access checks its alignment (FASTCE_ASSERT_ALIGNED): a GPU
// faults on a misaligned vector access where x86 forgives it.
#ifndef FASTCE_ASSERT_ALIGNED
#define FASTCE_ASSERT_ALIGNED(p, bytes) ((void)0)
#endif

__device__ __forceinline__ uint4 load_bits(const void* p, int width = 16) {
  FASTCE_ASSERT_ALIGNED(p, width);
  if (width == 16) return *reinterpret_cast<const uint4*>(p);
  if (width == 8) {
    const uint2* q = reinterpret_cast<const uint2*>(p);
    const uint2 lo = q[0], hi = q[1];
    return make_uint4(lo.x, lo.y, hi.x, hi.y);
  }
  if (width == 4) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
    return make_uint4(q[0], q[1], q[2], q[3]);
  }
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);  // 2-byte aligned (16-bit dtypes)
  auto pair = [&](int i) { return uint32_t(q[2 * i]) | uint32_t(q[2 * i + 1]) << 16; };
  return make_uint4(pair(0), pair(1), pair(2), pair(3));
}

__device__ __forceinline__ void store_bits(void* p, const uint4& b, int width = 16) {
  FASTCE_ASSERT_ALIGNED(p, width);
  if (width == 16) {
    *reinterpret_cast<uint4*>(p) = b;
  } else if (width == 8) {
    uint2* q = reinterpret_cast<uint2*>(p);
    q[0] = make_uint2(b.x, b.y);
    q[1] = make_uint2(b.z, b.w);
  } else if (width == 4) {
    uint32_t* q = reinterpret_cast<uint32_t*>(p);
    q[0] = b.x; q[1] = b.y; q[2] = b.z; q[3] = b.w;
  } else {
    uint16_t* q = reinterpret_cast<uint16_t*>(p);
    const uint32_t w[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[2 * i] = uint16_t(w[i] & 0xffffu);
      q[2 * i + 1] = uint16_t(w[i] >> 16);
    }
  }
}

// Bits <-> acc values of one vector (kVec elements).
template <class T> struct Codec;
template <> struct Codec<float> {
  static __device__ __forceinline__ void decode(const uint4& b, float* out) {
    out[0] = __uint_as_float(b.x); out[1] = __uint_as_float(b.y);
    out[2] = __uint_as_float(b.z); out[3] = __uint_as_float(b.w);
  }
  static __device__ __forceinline__ uint4 encode(const float* v) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};
template <> struct Codec<double> {
  static __device__ __forceinline__ void decode(const uint4& b, double* out) {
    out[0] = __hiloint2double(int(b.y), int(b.x));
    out[1] = __hiloint2double(int(b.w), int(b.z));
  }
  static __device__ __forceinline__ uint4 encode(const double* v) {
    return make_uint4(uint32_t(__double2loint(v[0])), uint32_t(__double2hiint(v[0])), uint32_t(__double2loint(v[1])),
                      uint32_t(__double2hiint(v[1])));
  }
};
template <> struct Codec<__nv_bfloat16> {
  static __device__ __forceinline__ void decode(const uint4& b, float* out) {
    const uint32_t w[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 -> float is a 16-bit shift, exact
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint4 encode(const float* v) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);  // .x is the low half
      memcpy(&w[i], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <> struct Codec<__half> {
  static __device__ __forceinline__ void decode(const uint4& b, float* out) {
    const uint32_t w[4] = {b.x, b.y, b.z, b.w};
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
  static __device__ __forceinline__ uint4 encode(const float* v) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&w[i], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// One vector at p into out[0, kVec) / from v[0, kVec) to p; width: see load_bits.
template <class T>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T>* out, int width = 16) {
  Codec<T>::decode(load_bits(p, width), out);
}
template <class T>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T>* v, int width = 16) {
  store_bits(p, Codec<T>::encode(v), width);
}

// A result computed in double, rounded once to the element type.
__device__ __forceinline__ void store_double(float* p, double v) { *p = float(v); }
__device__ __forceinline__ void store_double(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_double(__nv_bfloat16* p, double v) { *p = __double2bfloat16(v); }
__device__ __forceinline__ void store_double(__half* p, double v) { *p = __double2half(v); }

// ---- math -------------------------------------------------------------------------------
// 2^v as one MUFU op, ex2.approx.ftz: what exp2f compiles to for results of at least 2^-126
// (the same bits there), without the three instructions per element exp2f spends to scale
// smaller results into the subnormal range; those flush to 0 instead. Such a term vanishes
// against a row's sum (whose largest term is 1), and a probability below 2^-126 becomes a
// gradient of 0 instead of a subnormal. The emulation flushes the same way
// (test_exp2_flush_to_zero_accuracy).
__device__ __forceinline__ float exp2_ftz(float v) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  const float r = exp2f(v);
  return r < FLT_MIN ? 0.0f : r;  // NaN stays NaN
#endif
}

// exp(d) for d <= 0 (d = z - max or z - lse). exp2 of d*log2(e); rounding d*log2(e) costs a
// relative error of 2^-24 * |d| * 1.44 in the result, negligible where the terms matter (d
// near 0). NaN stays NaN, -inf gives 0.
__device__ __forceinline__ float exp_neg(float d) { return exp2_ftz(d * 1.4426950408889634f); }
__device__ __forceinline__ double exp_neg(double d) { return exp(d); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }  // ignores NaN
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
// Products that the compiler may not fuse into an FMA (keeps merge() symmetric).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// The logit transform of rules.h, in its capped or scaled form (kernels are compiled per form).
template <class A, bool Cap>
struct Transform {
  LogitTransform<A> t;
  __device__ explicit Transform(const LossOptions& o) : t(logit_transform<A>(o)) {}
  __device__ __forceinline__ A z(A x) const {
    if constexpr (Cap) return capped_z(t, x); else return scaled_z(t, x);
  }
  __device__ __forceinline__ A z_and_slope(A x, A& slope) const {  // slope = dz/dx
    if constexpr (Cap) return capped_z_slope(t, x, slope);
    slope = t.scale;
    return scaled_z(t, x);
  }
};

// ---- online softmax statistics ------------------------------------------------------------
// max of z (NaN ignored) and the sum of exp(z - max), kept as top, the number of logits equal
// to the max (each contributes exactly 1), plus rest, the sum over the others: rest is summed
// among terms of its own size, so that a confident row (1 + 1e-5) keeps the 1e-5 to float
// precision instead of rounding it against the 1. Its lse then carries no more than float64's
// error, and the target's gradient p_t - 1 from exp(z_t - lse) stays accurate (backward.cu).
// A NaN logit makes rest NaN, which propagates through every merge to the lse. Plus the linear
// sums the loss needs (RowSums).
template <class A>
struct Stats {
  A m = -INFINITY, top = 0, rest = 0, wz = 0, wyz = 0, wy = 0;
};

// The max that exponentials are taken against: 0 while everything is -inf (no -inf - -inf).
template <class A>
__device__ __forceinline__ A exp_base(A m) {
  return m == -INFINITY ? A(0) : m;
}

// Folds b into a. Commutative bit for bit (fmax, sums and unfused products of the same two
// terms), so both lanes of a butterfly end up with identical values.
template <class A>
__device__ __forceinline__ void merge(Stats<A>& a, const Stats<A>& b) {
  const A m = max_acc(a.m, b.m), base = exp_base(m);
  auto top = [&](const Stats<A>& s) { return s.m == m ? s.top : A(0); };
  auto rest = [&](const Stats<A>& s) { return s.m == m ? s.rest : mul_rn(s.top + s.rest, exp_neg(s.m - base)); };
  const A merged_top = top(a) + top(b);
  a.rest = rest(a) + rest(b);
  a.top = merged_top;
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
    o.top = shfl_xor(st.top, off);
    o.rest = shfl_xor(st.rest, off);
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
// start of the array that decides alignment (the logits); every other array the callbacks
// touch is accessed at its vec_width (checked by the caller through vec_ok).
// Elements before the first 16-byte boundary and after the last whole vector go one by
// one to one(c); the aligned middle goes to vecs(c, N): N vectors of kVec elements at
// c + j * 32 * kVec (j < N), Batch (kBatch) at a time while there are enough, then singly.
// Without vec_ok every element goes to one(c). Lanes may finish at different times:
// the callbacks must not use warp collectives.
template <int Batch = kBatch, class T, class Vecs, class One>
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
  for (; v + (Batch - 1) * kWarp < nvec; v += Batch * kWarp)
    vecs(body + v * kVec, std::integral_constant<int, Batch>{});
  for (; v < nvec; v += kWarp) vecs(body + v * kVec, std::integral_constant<int, 1>{});
  for (int64_t c = body + nvec * kVec + lane; c < e; c += kWarp) one(c);
}

// Whether a row's pointer is aligned to its element size (vector access assumes it; torch's
// storage offsets are whole elements, so only a foreign pointer could break it).
template <class T>
__device__ __forceinline__ bool element_aligned(const T* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % sizeof(T)) == 0;
}
// The widest access (16, 8, 4 or 2 bytes) to `other` that is aligned wherever walk() puts a
// vector of the anchor (16-byte aligned there): the lowest set bit of their distance mod 16.
// Both element-aligned: at least sizeof(T). Uniform over a row, so over a warp.
template <class T>
__device__ __forceinline__ int vec_width(const T* anchor, const T* other) {
  if (other == nullptr) return 16;
  const int d = (mod16(other) - mod16(anchor)) & 15;
  return d == 0 ? 16 : d & -d;
}
// Whether `other` has the anchor's address mod 16 (both at full width wherever walk() puts a
// vector), for kernels that take no narrow path.
template <class T>
__device__ __forceinline__ bool same_alignment(const T* anchor, const T* other) {
  return other == nullptr || mod16(other) == mod16(anchor);
}
using Aligned = std::false_type;  // every array of the row at full 16-byte width
using Narrow = std::true_type;    // some array at its vec_width

// What the statistics sum besides the exponentials (see RowSums): class weights w (or
// nullptr), sum_c w_c z_c (need_wz: label smoothing of class indices), and for probability
// targets their smoothing.
template <class A>
struct SumsOf {
  const A* w;
  bool need_wz;
  SmoothedTarget<A> y;
};
template <class A, bool Prob>
__device__ __forceinline__ SumsOf<A> sums_of(const Rows& v) {
  const double eps = v.opt.label_smoothing;
  return {static_cast<const A*>(v.weight), !Prob && eps > 0, smoothed_target<A>(Prob ? eps : 0.0, v.classes)};
}

// Folds K logits (transformed in place into z) and their targets into st: one max
// over the batch, one rescale of the running sum, one exp per element.
template <int K, bool Prob, bool Cap, class A, class Index>
__device__ __forceinline__ void accumulate(Stats<A>& st, A* z, const A* y, const Transform<A, Cap>& tf,
                                           const SumsOf<A>& sums, Index index) {
  A m = st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    z[k] = tf.z(z[k]);
    m = max_acc(m, z[k]);
  }
  const A base = exp_base(m);
  if (m != st.m) {  // a new max: what was summed so far becomes rest, rescaled
    st.rest = (st.top + st.rest) * exp_neg(st.m - base);
    st.top = A(0);
    st.m = m;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const bool at_max = z[k] == base;
    st.top += at_max ? A(1) : A(0);
    st.rest += at_max ? A(0) : exp_neg(z[k] - base);
  }
  if (Prob || sums.need_wz) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A wk = sums.w != nullptr ? sums.w[index(k)] : A(1);
      if (sums.need_wz) st.wz += wk * z[k];
      if constexpr (Prob) {
        const A yw = (y[k] * sums.y.keep + sums.y.add) * wk;
        st.wyz += yw * z[k];
        st.wy += yw;
      }
    }
  }
}

// This lane's statistics of x[b, e) of one row (y: its probability targets, or nullptr);
// warp_merge combines the lanes'. Vectors are placed by x's alignment; targets that do not
// share it are read at their vec_width.
template <bool Prob, int Batch = kBatch, class T, class A, bool Cap>
__device__ __forceinline__ Stats<A> lane_stats(const T* xr, const T* yr, const Transform<A, Cap>& tf,
                                               const SumsOf<A>& sums, int64_t b, int64_t e, int lane) {
  constexpr int kVec = Traits<T>::kVec;
  Stats<A> st;
  const int wy = vec_width(xr, yr);
  auto run = [&](auto narrow) {
    const int width_y = decltype(narrow)::value ? wy : 16;
    auto vecs = [&](int64_t c, auto n) {
      constexpr int N = decltype(n)::value;
      A z[N * kVec], y[Prob ? N * kVec : 1];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        load_vec(xr + c + j * kWarp * kVec, z + j * kVec);
        if constexpr (Prob) load_vec(yr + c + j * kWarp * kVec, y + j * kVec, width_y);
      }
      accumulate<N * kVec, Prob>(st, z, y, tf, sums, [&](int k) { return c + (k / kVec) * kWarp * kVec + k % kVec; });
    };
    auto one = [&](int64_t c) {
      A z[1] = {A(load1(xr + c))}, y[1] = {A(0)};
      if constexpr (Prob) y[0] = A(load1(yr + c));
      accumulate<1, Prob>(st, z, y, tf, sums, [&](int) { return c; });
    };
    walk<Batch>(xr, b, e, element_aligned(xr) && element_aligned(yr), lane, vecs, one);
  };
  if constexpr (Prob) {
    if (wy != 16) run(Narrow{}); else run(Aligned{});
  } else {
    run(Aligned{});
  }
  return st;
}

// A row's lse from its merged statistics (rules.h: a NaN logit makes the sum NaN).
// (A +inf logit: inf - inf, NaN, as the CPU backend's sum of exp(z - max) gives.)
template <class A>
__device__ __forceinline__ RowLse lse_of(const Stats<A>& st) {
  const bool nan = st.rest != st.rest || st.m == A(INFINITY);
  return row_lse(double(st.m), double(st.top) + double(st.rest), nan);
}

// Where row r's class-index target lies. A target outside [0, V) that is not ignore_index
// trips a device-side assert; should asserts ever be compiled out it still maps to no class
// (local = -1), so that nothing out of bounds is read.
struct RowTarget {
  bool ignored;
  int64_t local;  // its index in this input's classes, or -1 (a class of another slice)
};
__device__ __forceinline__ RowTarget target_of(const Rows& v, int64_t r) {
  const int64_t t = v.target[r];
  if (t == v.opt.ignore_index) return {true, -1};
  FASTCE_KERNEL_ASSERT(t >= 0 && t < vocabulary(v.opt, v.classes) && "Target is out of bounds");
  const int64_t local = t - v.opt.class_offset;
  return {false, local >= 0 && local < v.classes ? local : -1};
}
// Class-index rows whose target is ignore_index read no logits and have no loss.
__device__ __forceinline__ bool ignored_row(const Rows& v, int64_t r) {
  return v.target != nullptr && v.target[r] == v.opt.ignore_index;
}

// sum_c w_c over this input's classes (C without weights), as label smoothing uses it.
__device__ __forceinline__ double class_weight_sum(const Rows& v) {
  return v.weight != nullptr && v.opt.label_smoothing > 0 ? *v.weight_sum : double(v.classes);
}

// A grid-stride loop over n items, one per warp: f(i) for this warp's items. Every lane of the
// warp calls f with the same i, so f may use warp collectives (and `return` ends an item).
template <class F>
__device__ __forceinline__ void for_each_warp_item(int64_t n, F&& f) {
  for (int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; i < n;
       i += int64_t(gridDim.x) * kWarpsPerBlock)
    f(i);
}

// Work units (one per warp): unit = row * chunks + piece.
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
