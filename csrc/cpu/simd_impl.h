// The SIMD building blocks of the CPU kernels (loads and stores of every dtype, exp, tanh,
// reductions, the logit transform), written once with GCC vector extensions and compiled once
// per instruction set, with the kernels that include them (row_kernels_impl.h,
// lanes_kernels_impl.h). The including file defines FASTCE_ISA (the namespace), FASTCE_VW
// (float lanes: 4, 8 or 16), FASTCE_F16C (hardware half conversions) and, optionally,
// FASTCE_BF16_CVT (AVX512-BF16 conversions), includes the standard headers, then switches the
// target options on around it. FASTCE_INLINE stays defined for the kernels; they undefine it.
//
// Accumulation is in float for float/bfloat16/half inputs and in double for double
// inputs (which take the scalar path: W = 1).

namespace fastce::cpu::FASTCE_ISA {
namespace {

#define FASTCE_INLINE inline __attribute__((always_inline))

constexpr int VW = FASTCE_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Rows are processed in blocks that stay in L1: z is computed once into a float
// buffer, then exponentiated against the block's max (one exp per element). The
// block, its z buffer and the next block (prefetched) fit in 32 KiB.
template <class T> constexpr int64_t kBlock = sizeof(T) == 2 ? 4096 : 2048;

template <class T> struct Acc { using scalar = float; using reg = vf; static constexpr int W = VW; };
template <> struct Acc<double> { using scalar = double; using reg = double; static constexpr int W = 1; };

FASTCE_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
FASTCE_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// ---- scalar conversions -------------------------------------------------------
FASTCE_INLINE float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }
FASTCE_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u = float_to_bits(f);
  if (f != f) return uint16_t((u >> 16) | 0x0040);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
#include "half_impl.h"

FASTCE_INLINE float load1(const float* p) { return *p; }
FASTCE_INLINE double load1(const double* p) { return *p; }
FASTCE_INLINE float load1(const bf16* p) { return bf16_to_float(p->bits); }
FASTCE_INLINE float load1(const f16* p) { return f16_to_float(p->bits); }
FASTCE_INLINE void store1(float* p, float v) { *p = v; }
FASTCE_INLINE void store1(double* p, double v) { *p = v; }
FASTCE_INLINE void store1(bf16* p, float v) { p->bits = float_to_bf16(v); }
FASTCE_INLINE void store1(f16* p, float v) { p->bits = float_to_f16(v); }

// ---- vector loads and stores (unaligned) ---------------------------------------
FASTCE_INLINE vf splat(float a) { return vf{} + a; }
FASTCE_INLINE double splat(double a) { return a; }

#if FASTCE_VW == 16
// 16 bfloat16 / half values (in a 256-bit register) as floats. bfloat16: one vpmovzxwd
// (GCC splits __builtin_convertvector into 256-bit halves: five instructions).
FASTCE_INLINE vf widen(const bf16*, __m256i h) {
  return (vf)((vu)_mm512_maskz_cvtepu16_epi32(0xFFFF, h) << 16);
}
FASTCE_INLINE vf widen(const f16*, __m256i h) { return (vf)_mm512_maskz_cvtph_ps(0xFFFF, h); }
#endif

FASTCE_INLINE vf loadv(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
FASTCE_INLINE double loadv(const double* p) { return *p; }
FASTCE_INLINE vf loadv(const bf16* p) {
#if FASTCE_VW == 16
  return widen(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  vh h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
FASTCE_INLINE vf loadv(const f16* p) {
#if FASTCE_F16C && FASTCE_VW == 16
  return widen(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif FASTCE_F16C && FASTCE_VW == 8
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = f16_to_float(p[i].bits);
  return v;
#endif
}
#if FASTCE_VW == 16
// The first n (< 16) values at p as floats, zeros after them; nothing past p + n is read.
FASTCE_INLINE __mmask16 first_lanes(int n) { return __mmask16((1u << n) - 1u); }
FASTCE_INLINE vf load_first(const float* p, int n) {
  return (vf)_mm512_maskz_loadu_ps(first_lanes(n), p);
}
template <class T16>
FASTCE_INLINE vf load_first(const T16* p, int n) {
  return widen(p, _mm256_maskz_loadu_epi16(first_lanes(n), p));
}
#endif
// Class weights are stored in the accumulation type.
FASTCE_INLINE vf loadw(const float* p) { return loadv(p); }
FASTCE_INLINE double loadw(const double* p) { return *p; }

// v rounded to bfloat16 (to nearest even, NaN kept quiet), in each lane's low 16 bits.
FASTCE_INLINE vu bf16_bits(vf v) {
  const vu u = (vu)v;
  const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vu quiet_nan = (u >> 16) | 0x0040u;
  return v != v ? quiet_nan : rounded;
}

FASTCE_INLINE void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
FASTCE_INLINE void storev(double* p, double v) { *p = v; }
FASTCE_INLINE void storev(bf16* p, vf v) {
#if FASTCE_BF16_CVT
  // vcvtneps2bf16 rounds to nearest even but flushes subnormals to zero: those (rare)
  // vectors take the exact path below.
  if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)v, 0x20) == 0, 1)) {
    const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    std::memcpy(p, &h, sizeof h);
    return;
  }
#endif
  const vh h = __builtin_convertvector(bf16_bits(v), vh);
  std::memcpy(p, &h, sizeof h);
}
FASTCE_INLINE void storev(f16* p, vf v) {
#if FASTCE_F16C && FASTCE_VW == 16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(0xFFFF, (__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif FASTCE_F16C && FASTCE_VW == 8
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < VW; ++i) p[i].bits = float_to_f16(v[i]);
#endif
}

#if FASTCE_VW == 16
// Stores the first n (< 16) lanes of v at p; nothing past p + n is written.
FASTCE_INLINE void store_first(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), (__m512)v); }
template <class T16>
FASTCE_INLINE void store_first(T16* p, vf v, int n) {
  alignas(32) T16 h[16];
  storev(h, v);
  _mm256_mask_storeu_epi16(p, first_lanes(n), _mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
}
#endif

#if FASTCE_VW == 16
// ---- bfloat16 pairs: 32 values per 512-bit register ------------------------------
// As 16 32-bit lanes, 32 bfloat16 values hold the even ones in the low halves (shifted up
// 16 bits they are floats) and the odd ones in the high halves (with the low bits cleared):
// one instruction per 16 floats, where a widening load takes two.
struct Pair { vf even, odd; };
FASTCE_INLINE Pair split(__m512i raw) {
  return {(vf)_mm512_slli_epi32(raw, 16), (vf)_mm512_and_si512(raw, _mm512_set1_epi32(int(0xFFFF0000u)))};
}
FASTCE_INLINE __m512i load_pair(const bf16* p) { return _mm512_loadu_si512(p); }
// The first n (< 32) values and `fill` (bfloat16 bits; -inf unless given) after them;
// nothing past p + n is read.
FASTCE_INLINE __m512i load_pair_first(const bf16* p, int n, uint16_t fill = 0xFF80) {
  return _mm512_mask_loadu_epi16(_mm512_set1_epi16(int16_t(fill)), __mmask32((1u << n) - 1u), p);
}

// The largest of bfloat16 values from their bits, kept as a running signed maximum and
// unsigned minimum of the 16-bit patterns: with a value >= +0 present, the largest is the
// signed maximum; otherwise (all negative) the one of least magnitude, the unsigned minimum.
// -inf (the padding) is neutral to both. A positive NaN wins, a negative one never beats a
// non-NaN value; either way the block's sum of exponentials is NaN.
struct Bf16Max {
  __m512i smax, umin;
  FASTCE_INLINE Bf16Max() : smax(_mm512_set1_epi16(int16_t(0x8000))), umin(_mm512_set1_epi16(-1)) {}
  FASTCE_INLINE void add(__m512i raw) {
    smax = _mm512_max_epi16(smax, raw);
    umin = _mm512_min_epu16(umin, raw);
  }
  FASTCE_INLINE float value() const {
    const __m512i s = _mm512_max_epi32(_mm512_srai_epi32(_mm512_slli_epi32(smax, 16), 16), _mm512_srai_epi32(smax, 16));
    const __m512i u = _mm512_min_epu32(_mm512_and_si512(umin, _mm512_set1_epi32(0xFFFF)), _mm512_srli_epi32(umin, 16));
    const int32_t signed_max = _mm512_reduce_max_epi32(s);
    const uint32_t bits = signed_max >= 0 ? uint32_t(signed_max) : _mm512_reduce_min_epu32(u);
    return bits_to_float(bits << 16);
  }
};

// Stores 32 bfloat16 values from their even and odd floats.
FASTCE_INLINE void store_pair(bf16* p, vf even, vf odd) {
#if FASTCE_BF16_CVT
  if (__builtin_expect((_mm512_fpclass_ps_mask((__m512)even, 0x20) | _mm512_fpclass_ps_mask((__m512)odd, 0x20)) == 0, 1)) {
    // evens in words 0-15, odds in words 16-31, then interleaved (see storev for subnormals)
    const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh((__m512)odd, (__m512)even);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, packed));
    return;
  }
#endif
  const vu words = bf16_bits(even) | (bf16_bits(odd) << 16);
  std::memcpy(p, &words, sizeof words);
}
#endif

// ---- math -----------------------------------------------------------------------
FASTCE_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
FASTCE_INLINE double vmax(double a, double b) { return a > b ? a : b; }

// exp for x <= 88 (every caller passes z - max <= 0, or -2|u|). Precise (float rows, and
// tanh), about 1 ulp: AVX-512 uses a 2^(j/16) table and a cubic, other sets a degree-6
// polynomial on [-ln2/2, ln2/2] after x = n ln2 + r. !Precise (bfloat16 and half rows,
// whose results carry 8 or 11 bits): degree 4 and a one-constant reduction, relative error
// < 3e-6 — fewer multiply-adds where the exponential is the bottleneck. NaN stays NaN; -inf
// and anything below about -87.3 (AVX-512: -103, with subnormal results) give exactly 0,
// so masked logits get zero probability.
template <bool Precise>
FASTCE_INLINE vf vexp(vf x) {
#if FASTCE_VW == 16
  // vscalefps multiplies by 2^n with IEEE underflow: no exponent arithmetic, no mask.
  // The clamp keeps -inf out of r; vmaxps returns its second operand, x, when x is NaN.
  // (The _mask_ forms, with every lane set, avoid GCC 12's -Wuninitialized on the plain ones.)
  x = (vf)_mm512_mask_max_ps((__m512)x, 0xFFFF, (__m512)splat(-104.0f), (__m512)x);
#else
  const vi underflow = x < -87.33654f;
#endif
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
#if FASTCE_VW == 16
  if constexpr (Precise) {
    // x = (k/16) ln2 + r, |r| <= ln2/32: exp(x) = 2^floor(k/16) * 2^((k mod 16)/16) * e^r,
    // the middle factor from a 16-entry table (vpermps reads k mod 16 from t's low bits),
    // e^r from a cubic (error r^4/24 < 1e-8). Eight multiply-adds instead of eleven.
    alignas(64) static constexpr float kPow2Sixteenths[16] = {
        1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f,
        1.1892070770263672f, 1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f,
        1.4142135381698608f, 1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f,
        1.6817928552627563f, 1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f};
    const vf t = x * 23.083120346069336f + magic;
    const vf k = t - magic;
    vf r = x - k * 0.0433197021484375f;  // ln2/16 in two parts: k * hi is exact
    r = r - k * 1.9966364561696537e-06f;
    vf q = splat(1.6666666666666666e-1f);  // q = e^r - 1
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r;
    const vf f = (vf)_mm512_maskz_permutexvar_ps(0xFFFF, (__m512i)t, _mm512_load_ps(kPow2Sixteenths));
    const vf scaled = f * q + f;  // one rounding: f e^r = f + f q
    return (vf)_mm512_mask_scalef_ps((__m512)scaled, 0xFFFF, (__m512)scaled, (__m512)(k * 0.0625f));
  }
#endif
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  vf p;
  if constexpr (Precise) {
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
  } else {
    const vf r = x - n * 0.693147182f;
    p = splat(4.151369631e-2f);
    p = p * r + 1.678745747e-1f;
    p = p * r + 5.000301600e-1f;
    p = p * r + 9.999668598e-1f;
    p = p * r + 1.0f;
  }
#if FASTCE_VW == 16
  return (vf)_mm512_mask_scalef_ps((__m512)p, 0xFFFF, (__m512)p, (__m512)n);
#else
  const vi ni = (vi)t - (vi)splat(magic);
  const vf result = p * (vf)((ni + 127) << 23);
  return underflow ? splat(0.0f) : result;
#endif
}
template <bool Precise>
FASTCE_INLINE double vexp(double x) { return std::exp(x); }
FASTCE_INLINE float sexp(float x) { return std::exp(x); }
FASTCE_INLINE double sexp(double x) { return std::exp(x); }

// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1: no overflow.
FASTCE_INLINE vf vtanh(vf u) {
  const vf a = u < 0.0f ? -u : u;
  const vf e = vexp<true>(-2.0f * a);
  const vf t = (1.0f - e) / (1.0f + e);
  return u < 0.0f ? -t : t;
}
FASTCE_INLINE double vtanh(double u) { return std::tanh(u); }
FASTCE_INLINE float stanh(float u) { return std::tanh(u); }
FASTCE_INLINE double stanh(double u) { return std::tanh(u); }

// 16-bit rows take the shorter exponential (see vexp).
template <class T> constexpr bool kPreciseExp = sizeof(T) >= 4;

#if FASTCE_VW == 16
// Halving trees (GCC writes the loops below as 15-step chains). A NaN lane may or may not
// survive hmax; either way the block's sum of exponentials becomes NaN (see piece_stats_t).
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
template <class Op>
FASTCE_INLINE float reduce16(vf v, Op op) {
  const vf8 a = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const vf4 b = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  return op(op(b[0], b[2]), op(b[1], b[3]));
}
FASTCE_INLINE float hsum(vf v) { return reduce16(v, [](auto a, auto b) { return a + b; }); }
FASTCE_INLINE float hmax(vf v) { return reduce16(v, [](auto a, auto b) { return a > b ? a : b; }); }
#else
FASTCE_INLINE float hsum(vf v) { float s = 0.0f; for (int i = 0; i < VW; ++i) s += v[i]; return s; }
FASTCE_INLINE float hmax(vf v) { float m = v[0]; for (int i = 1; i < VW; ++i) m = v[i] > m ? v[i] : m; return m; }
#endif
FASTCE_INLINE double hsum(double v) { return v; }
FASTCE_INLINE double hmax(double v) { return v; }

// z = logit_scale * x, optionally soft-capped: z = cap * tanh(logit_scale * x / cap).
// The vector code is compiled per map, so the common logit_scale = 1 costs no multiply
// (x * 1 is exact: the scalar code, used for tails and the target, may keep it).
enum class ZMap { Identity, Scale, Cap };

template <class S>
struct Transform {
  S scale, cap, u_coef;  // u_coef = scale / cap
  explicit Transform(const RowConfig& cfg)
      : scale(S(cfg.logit_scale)), cap(S(cfg.softcap)),
        u_coef(cfg.softcap > 0 ? S(cfg.logit_scale / cfg.softcap) : S(0)) {}
  template <ZMap M, class R> FASTCE_INLINE R z(R x) const {
    if constexpr (M == ZMap::Cap) return vtanh(x * u_coef) * cap;
    else if constexpr (M == ZMap::Scale) return x * scale;
    else return x;
  }
  // z and dz/dx together (Identity: the slope, 1, is left as the caller set it).
  template <ZMap M, class R> FASTCE_INLINE R z_and_slope(R x, R& slope) const {
    if constexpr (M == ZMap::Cap) {
      const R t = vtanh(x * u_coef);
      slope = (S(1) - t * t) * scale;
      return t * cap;
    } else if constexpr (M == ZMap::Scale) {
      slope = splat(scale);
      return x * scale;
    } else {
      return x;
    }
  }
  template <ZMap M> FASTCE_INLINE S z1(S x) const {
    if constexpr (M == ZMap::Cap) return stanh(x * u_coef) * cap; else return x * scale;
  }
  template <ZMap M> FASTCE_INLINE S z1_and_slope(S x, S& slope) const {
    if constexpr (M == ZMap::Cap) {
      const S t = stanh(x * u_coef);
      slope = (S(1) - t * t) * scale;
      return t * cap;
    } else {
      slope = scale;
      return x * scale;
    }
  }
};

}  // namespace
}  // namespace fastce::cpu::FASTCE_ISA
