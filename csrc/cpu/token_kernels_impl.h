// Vector row kernels of the token ops, written once with GCC vector extensions and compiled
// once per instruction set (token_kernels_{generic,avx2,avx512}.cpp define FASTCE_TOKEN_ISA,
// FASTCE_VW (float lanes) and FASTCE_F16C, include the standard headers, and switch the
// target options on around this file).
//
// One pass per row: a block of logits is transformed into an L1 buffer, then exponentiated
// against the block's max for sum exp(z - m) and, for the entropy, sum exp(z - m) (z - m);
// blocks merge with merge_token_stats (rules.h). Accumulation is in float (double for double
// rows, which take the scalar path: one lane).

namespace fastce::cpu::FASTCE_TOKEN_ISA {
namespace {

#define FASTCE_INLINE inline __attribute__((always_inline))

constexpr int VW = FASTCE_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

constexpr int64_t kBlock = 2048;  // floats of z per block: 8 KiB, with the logits' block in L1

template <class T> struct Acc { using scalar = float; using reg = vf; static constexpr int W = VW; };
template <> struct Acc<double> { using scalar = double; using reg = double; static constexpr int W = 1; };

FASTCE_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
FASTCE_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
#include "half_impl.h"

// ---- scalar loads and stores (rounding to nearest even) ---------------------------------
FASTCE_INLINE float load1(const float* p) { return *p; }
FASTCE_INLINE double load1(const double* p) { return *p; }
FASTCE_INLINE float load1(const bf16* p) { return bits_to_float(uint32_t(p->bits) << 16); }
FASTCE_INLINE float load1(const f16* p) { return f16_to_float(p->bits); }
FASTCE_INLINE void store1(float* p, float v) { *p = v; }
FASTCE_INLINE void store1(double* p, double v) { *p = v; }
FASTCE_INLINE void store1(bf16* p, float v) {
  uint32_t u = float_to_bits(v);
  p->bits = v != v ? uint16_t((u >> 16) | 0x0040) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
FASTCE_INLINE void store1(f16* p, float v) { p->bits = float_to_f16(v); }

// ---- vector loads and stores ------------------------------------------------------------
FASTCE_INLINE vf splat(float a) { return vf{} + a; }
FASTCE_INLINE double splat(double a) { return a; }
FASTCE_INLINE vf loadv(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
FASTCE_INLINE double loadv(const double* p) { return *p; }
FASTCE_INLINE vf loadv(const bf16* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
FASTCE_INLINE vf loadv(const f16* p) {
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = f16_to_float(p[i].bits);
  return v;
}
FASTCE_INLINE void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
FASTCE_INLINE void storev(double* p, double v) { *p = v; }
FASTCE_INLINE void storev(bf16* p, vf v) {
  const vu u = (vu)v;
  const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vu bits = v != v ? (u >> 16) | 0x0040u : rounded;
  const vh h = __builtin_convertvector(bits, vh);
  std::memcpy(p, &h, sizeof h);
}
FASTCE_INLINE void storev(f16* p, vf v) {
  for (int i = 0; i < VW; ++i) p[i].bits = float_to_f16(v[i]);
}

// ---- math ----------------------------------------------------------------------------------
FASTCE_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
FASTCE_INLINE double vmax(double a, double b) { return a > b ? a : b; }

// exp(x) for x <= 88 (every caller passes z - max <= 0 or -2|u|), about 1 ulp: x = n ln2 + r,
// a degree-6 polynomial on |r| <= ln2/2. NaN stays NaN; below about -87.3 (-inf included)
// it is exactly 0, so masked logits get zero probability.
FASTCE_INLINE vf vexp(vf x) {
  const vi underflow = x < -87.33654f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi ni = (vi)t - (vi)splat(magic);
  const vf result = p * (vf)((ni + 127) << 23);
  return underflow ? splat(0.0f) : result;
}
FASTCE_INLINE double vexp(double x) { return std::exp(x); }
FASTCE_INLINE float sexp(float x) { return std::exp(x); }
FASTCE_INLINE double sexp(double x) { return std::exp(x); }

// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1: no overflow.
FASTCE_INLINE vf vtanh(vf u) {
  const vf a = u < 0.0f ? -u : u;
  const vf e = vexp(-2.0f * a);
  const vf t = (1.0f - e) / (1.0f + e);
  return u < 0.0f ? -t : t;
}
FASTCE_INLINE double vtanh(double u) { return std::tanh(u); }
// The scalar tanh of the tails and single logits, the same formula as the lanes'.
FASTCE_INLINE float stanh(float u) { return vtanh(splat(u))[0]; }
FASTCE_INLINE double stanh(double u) { return std::tanh(u); }

FASTCE_INLINE float hsum(vf v) { float s = 0.0f; for (int i = 0; i < VW; ++i) s += v[i]; return s; }
FASTCE_INLINE float hmax(vf v) { float m = v[0]; for (int i = 1; i < VW; ++i) m = v[i] > m ? v[i] : m; return m; }
FASTCE_INLINE double hsum(double v) { return v; }
FASTCE_INLINE double hmax(double v) { return v; }

// ---- the logit transform (rules.h: token_transform), per form -----------------------------
enum class ZMap { Identity, Scale, Cap };

template <class S>
struct Transform {
  LogitTransform<S> t;
  explicit Transform(const TokenOptions& o) : t(token_transform<S>(o)) {}
  // z, and dz/dx in slope (Identity leaves slope as the caller set it: 1).
  template <ZMap M, class R> FASTCE_INLINE R z(R x, R& slope) const {
    if constexpr (M == ZMap::Cap) {
      const R u = vtanh(x * t.u_coef);
      slope = (S(1) - u * u) * t.scale;
      return u * t.cap;
    } else if constexpr (M == ZMap::Scale) {
      slope = splat(t.scale);
      return x * t.scale;
    } else {
      return x;
    }
  }
  template <ZMap M, class R> FASTCE_INLINE R z(R x) const {
    R slope = splat(S(1));
    return z<M>(x, slope);
  }
  template <ZMap M> FASTCE_INLINE S z1(S x, S& slope) const {
    if constexpr (M == ZMap::Cap) {
      const S u = stanh(x * t.u_coef);
      slope = (S(1) - u * u) * t.scale;
      return u * t.cap;
    } else if constexpr (M == ZMap::Scale) {
      slope = t.scale;
      return x * t.scale;
    } else {
      slope = S(1);
      return x;
    }
  }
};

// ---- the statistics of a piece of a row ----------------------------------------------------
// The argmax of a block of n values of z (see TokenStats::argmax): its first NaN when
// may_have_nan finds one (then nan is set), else its first value equal to its max m.
template <class S>
int64_t block_argmax(const S* z, int64_t n, S m, bool may_have_nan, bool& nan) {
  for (int64_t i = 0; may_have_nan && i < n; ++i)
    if (z[i] != z[i]) {
      nan = true;
      return i;
    }
  for (int64_t i = 0; i < n; ++i)
    if (z[i] == m) return i;
  return 0;  // (unreachable: m is one of the values)
}

template <class T, ZMap M, bool Entropy, bool Argmax>
void stats_t(const TokenRowConfig& cfg, const T* x, int64_t begin, int64_t end, TokenStats* out) {
  using S = typename Acc<T>::scalar;
  using R = typename Acc<T>::reg;
  constexpr int W = Acc<T>::W;
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  const Transform<S> tf(cfg.opt);
  alignas(64) S zbuf[kBlock + W];
  TokenStats st;
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, end - b0);
    const int64_t nv = n - n % W;
    R vm = splat(kNegInf);
    for (int64_t i = 0; i < nv; i += W) {
      const R z = tf.template z<M>(loadv(x + b0 + i));
      storev(zbuf + i, z);
      vm = vmax(vm, z);
    }
    S m = hmax(vm);
    for (int64_t i = nv; i < n; ++i) {
      S slope;
      const S z = tf.template z1<M>(S(load1(x + b0 + i)), slope);
      zbuf[i] = z;
      m = z > m ? z : m;
    }
    if (m == kNegInf) {  // nothing but -inf and NaN: no mass
      TokenStats block;
      for (int64_t i = 0; i < n; ++i) block.has_nan |= zbuf[i] != zbuf[i];
      if constexpr (Argmax) {
        bool nan = false;
        block.argmax = b0 + block_argmax(zbuf, n, m, block.has_nan, nan);
      }
      merge_token_stats(st, block);
      continue;
    }
    const int64_t padded = (n + W - 1) / W * W;
    for (int64_t i = n; i < padded; ++i) zbuf[i] = kNegInf;  // exp gives 0
    R vs = splat(S(0)), ved = splat(S(0));
    for (int64_t i = 0; i < padded; i += W) {
      R z;
      std::memcpy(&z, zbuf + i, sizeof z);
      const R d = z - m;
      const R e = vexp(d);
      vs += e;
      // (A masked class, e = 0 and d = -inf, adds nothing: see TokenStats.)
      if constexpr (Entropy) ved += e == S(0) ? e : e * d;
    }
    TokenStats block;
    block.max = double(m);
    block.sumexp = double(hsum(vs));
    block.sum_ed = double(hsum(ved));
    if constexpr (Argmax) {
      // Only a block that may win is scanned: one with a NaN (its sum is NaN; +inf makes it
      // NaN too, then no NaN is found) or a larger max.
      const bool may_have_nan = block.sumexp != block.sumexp;
      if (may_have_nan || block.max > st.max || st.argmax < 0)
        block.argmax = b0 + block_argmax(zbuf, n, m, may_have_nan, block.has_nan);
    }
    merge_token_stats(st, block);
  }
  *out = st;
}

// ---- the gradient of a piece of a row ------------------------------------------------------
// lse = lse_hi + lse_lo: z - lse stays exact in float for large logits.
template <class S>
struct SplitLse {
  S hi, lo;
  explicit SplitLse(double lse) : hi(S(lse)), lo(S(lse - double(S(lse)))) {}
};

template <class T, ZMap M>
void grad_t(const TokenRowConfig& cfg, const T* x, T* gx, int64_t begin, int64_t end, const TokenGrad& g) {
  using S = typename Acc<T>::scalar;
  using R = typename Acc<T>::reg;
  constexpr int W = Acc<T>::W;
  const Transform<S> tf(cfg.opt);
  const SplitLse<S> lse(g.lse);
  const S g_sum = S(g.g_sum), g_h = S(g.g_h), mean_z = S(g.mean_z);
  auto grad_of = [&](R xv) {
    R slope = splat(S(1));
    const R z = tf.template z<M>(xv, slope);
    const R p = vexp((z - lse.hi) - lse.lo);
    const R shared = token_grad_shared(p, z, g_sum, g_h, mean_z);
    return M == ZMap::Identity ? shared : shared * slope;
  };
  int64_t c = begin;
  for (; c + W <= end; c += W) storev(gx + c, grad_of(loadv(x + c)));
  if (const int64_t tail = end - c; tail > 0) {
    T xt[W] = {}, gt[W];
    std::memcpy(xt, x + c, tail * sizeof(T));
    storev(gt, grad_of(loadv(xt)));
    std::memcpy(gx + c, gt, tail * sizeof(T));
  }
}

template <class T, ZMap M>
void add_onehot_t(const TokenRowConfig& cfg, const T* x, T* gx, int64_t index, const TokenGrad& g, double g_onehot) {
  using S = typename Acc<T>::scalar;
  const Transform<S> tf(cfg.opt);
  const SplitLse<S> lse(g.lse);
  S slope;
  const S z = tf.template z1<M>(S(load1(x + index)), slope);
  const S p = sexp((z - lse.hi) - lse.lo);
  const S shared = token_grad_shared(p, z, S(g.g_sum), S(g.g_h), S(g.mean_z));
  store1(gx + index, (shared + S(g_onehot)) * slope);
}

// ---- dispatch --------------------------------------------------------------------------------
template <class F>
FASTCE_INLINE auto with_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::Float64: return f(static_cast<double*>(nullptr));
    case Dtype::BFloat16: return f(static_cast<bf16*>(nullptr));
    case Dtype::Float16: return f(static_cast<f16*>(nullptr));
    default: return f(static_cast<float*>(nullptr));
  }
}
template <class F>
FASTCE_INLINE void with_flag(bool v, F&& f) {
  if (v) f(std::true_type{}); else f(std::false_type{});
}
template <class F>
FASTCE_INLINE auto with_zmap(const TokenOptions& o, F&& f) {
  if (o.softcap > 0) return f(std::integral_constant<ZMap, ZMap::Cap>{});
  if (!token_identity(o)) return f(std::integral_constant<ZMap, ZMap::Scale>{});
  return f(std::integral_constant<ZMap, ZMap::Identity>{});
}

void stats(const TokenRowConfig& cfg, const void* x, int64_t begin, int64_t end, TokenStats* out) {
  with_dtype(cfg.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_zmap(cfg.opt, [&](auto map) {
      with_flag(cfg.entropy, [&](auto entropy) {
        with_flag(cfg.argmax, [&](auto argmax) {
          stats_t<T, map.value, entropy.value, argmax.value>(cfg, static_cast<const T*>(x), begin, end, out);
        });
      });
    });
  });
}

double z_one(const TokenRowConfig& cfg, const void* x, int64_t index) {
  return with_dtype(cfg.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using S = typename Acc<T>::scalar;
    const Transform<S> tf(cfg.opt);
    return with_zmap(cfg.opt, [&](auto map) {
      S slope;
      return double(tf.template z1<map.value>(S(load1(static_cast<const T*>(x) + index)), slope));
    });
  });
}

void grad(const TokenRowConfig& cfg, const void* x, void* gx, int64_t begin, int64_t end, const TokenGrad& g) {
  with_dtype(cfg.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_zmap(cfg.opt, [&](auto map) {
      grad_t<T, map.value>(cfg, static_cast<const T*>(x), static_cast<T*>(gx), begin, end, g);
    });
  });
}

void add_onehot(const TokenRowConfig& cfg, const void* x, void* gx, int64_t index, const TokenGrad& g,
                double g_onehot) {
  with_dtype(cfg.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_zmap(cfg.opt, [&](auto map) {
      add_onehot_t<T, map.value>(cfg, static_cast<const T*>(x), static_cast<T*>(gx), index, g, g_onehot);
    });
  });
}

#undef FASTCE_INLINE
}  // namespace

const TokenKernels& table() {
  static const TokenKernels k{FASTCE_TOKEN_ISA_NAME, &stats, &z_one, &grad, &add_onehot};
  return k;
}

}  // namespace fastce::cpu::FASTCE_TOKEN_ISA
