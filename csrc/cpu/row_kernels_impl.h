// SIMD row kernels, written once with GCC vector extensions and compiled once per
// instruction set. The including file (row_kernels_generic.cpp, row_kernels_x86.h)
// defines FASTCE_ISA (the namespace), FASTCE_ISA_NAME, FASTCE_VW (float lanes: 4, 8 or
// 16), FASTCE_F16C (hardware half conversions) and, optionally, FASTCE_BF16_CVT
// (AVX512-BF16 conversions), includes the standard headers, then switches the target
// options on around this file.
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
FASTCE_INLINE float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float v = float(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(float_to_bits(v) | sign);
  }
  if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
FASTCE_INLINE uint16_t float_to_f16(float f) {  // round to nearest even
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;    // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;   // |f| >= 65520 rounds to infinity
  if (a < 0x38800000u) {                          // below 2^-14: a subnormal half
    return sign | uint16_t(std::nearbyint(bits_to_float(a) * 16777216.0f));
  }
  const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
  return sign | uint16_t((rounded - (112u << 23)) >> 13);
}

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

// ---- forward statistics of a piece of a row ------------------------------------
// NaN needs no test per element: exp(NaN - max) makes the block's sum NaN, and a block
// whose max is -inf (nothing but -inf and NaN) is scanned for NaN before it is skipped.
template <class T, bool HasW, bool HasY, ZMap M, bool SumZ>
void piece_stats_t(const RowConfig& cfg, const T* x, const T* y, int64_t begin, int64_t end,
                   PieceStats* out) {
  using S = typename Acc<T>::scalar;
  using R = typename Acc<T>::reg;
  constexpr int W = Acc<T>::W;
  const S* w = static_cast<const S*>(cfg.weight);
  const Transform<S> tf(cfg);
  // y2 = (1 - eps) y + eps / C, formed per class (as torch does) so that a masked class
  // (z = -inf) with y = 0 still counts eps / C * -inf rather than 0 * -inf = NaN.
  const S y_keep = S(1.0 - cfg.prob_smoothing), y_add = S(cfg.prob_smoothing / double(cfg.num_classes));
  alignas(64) S zbuf[kBlock<T>];

  PieceStats st;
  R acc_wz = splat(S(0)), acc_wyz = splat(S(0)), acc_wy = splat(S(0));
  S tail_wz = 0, tail_wyz = 0, tail_wy = 0;
  for (int64_t b0 = begin; b0 < end; b0 += kBlock<T>) {
    const int64_t n = std::min<int64_t>(kBlock<T>, end - b0);
#if FASTCE_VW == 16
    if constexpr (std::is_same_v<T, bf16> && M == ZMap::Identity && !HasY && !(SumZ && HasW)) {
      // Plain bfloat16 logits (the language-model case, label smoothing too): the max from
      // their bits, then the exponentials straight from the block (in L1), 32 per step; no
      // float copy.
      const bf16* xb = x + b0;
      const int64_t full = n - n % 32;
      Bf16Max bits_max;
      for (int64_t i = 0; i < full; i += 32) {
        const __m512i raw = load_pair(xb + i);
        bits_max.add(raw);
        if constexpr (SumZ) {
          const Pair v = split(raw);
          acc_wz += v.even + v.odd;
        }
      }
      if (const int rest = int(n - full); rest > 0) {
        bits_max.add(load_pair_first(xb + full, rest));
        if constexpr (SumZ) {  // zeros, not -inf, after the row's last values
          const Pair v = split(load_pair_first(xb + full, rest, 0));
          acc_wz += v.even + v.odd;
        }
      }
      const float m = bits_max.value();
      if (m == -std::numeric_limits<float>::infinity()) {  // as below
        for (int64_t i = 0; i < n; ++i) st.has_nan |= load1(xb + i) != load1(xb + i);
        continue;
      }
      const char* next = reinterpret_cast<const char*>(xb + n);
      vf even_sum = splat(0.0f), odd_sum = splat(0.0f);
      auto add_exps = [&](__m512i raw) {
        const Pair v = split(raw);
        even_sum += vexp<kPreciseExp<T>>(v.even - m);
        odd_sum += vexp<kPreciseExp<T>>(v.odd - m);
      };
      for (int64_t i = 0; i < full; i += 32) {
        __builtin_prefetch(next + i * sizeof(T));  // the next block, a line a step
        add_exps(load_pair(xb + i));
      }
      if (full < n) add_exps(load_pair_first(xb + full, int(n - full)));
      PieceStats block;
      block.max = m;
      block.sumexp = hsum(even_sum + odd_sum);
      merge_stats(st, block);
      continue;
    }
#endif
    const int64_t nv = n - n % W;
    // Plain float rows: z is x, read again from L1 rather than copied (the tail still is).
    constexpr bool kDirect = std::is_same_v<T, float> && M == ZMap::Identity && !HasY && !SumZ && W == 16;
    R vm = splat(-std::numeric_limits<S>::infinity());
    for (int64_t i = 0; i < nv; i += W) {
      const int64_t c = b0 + i;
      const R z = tf.template z<M>(loadv(x + c));
      if constexpr (!kDirect) storev(zbuf + i, z);
      vm = vmax(vm, z);
      if constexpr (SumZ) acc_wz += HasW ? z * loadw(w + c) : z;
      if constexpr (HasY) {
        const R ys = loadv(y + c) * y_keep + y_add;
        const R yw = HasW ? ys * loadw(w + c) : ys;
        acc_wyz += yw * z;
        acc_wy += yw;
      }
    }
#if FASTCE_VW == 16
    // Plain rows (no sums besides the exponentials): the tail is one masked vector whose
    // empty lanes hold -inf, which also pads the buffer. Short rows (C = 10) are all tail.
    constexpr bool kMaskedTail = !HasY && !SumZ && W == 16;
    if constexpr (kMaskedTail) {
      if (nv < n) {
        const int tail = int(n - nv);
        const R z = tf.template z<M>(load_first(x + b0 + nv, tail));
        const __m512 empty = (__m512)splat(-std::numeric_limits<S>::infinity());
        const R zt = (vf)_mm512_mask_blend_ps(first_lanes(tail), empty, (__m512)z);
        storev(zbuf + nv, zt);
        vm = vmax(vm, zt);
      }
    }
#else
    constexpr bool kMaskedTail = false;
#endif
    S m = hmax(vm);
    for (int64_t i = kMaskedTail ? n : nv; i < n; ++i) {
      const int64_t c = b0 + i;
      const S z = tf.template z1<M>(S(load1(x + c)));
      zbuf[i] = z;
      m = z > m ? z : m;
      const S wc = HasW ? w[c] : S(1);
      if constexpr (SumZ) tail_wz += wc * z;
      if constexpr (HasY) {
        const S yw = (S(load1(y + c)) * y_keep + y_add) * wc;
        tail_wyz += yw * z;
        tail_wy += yw;
      }
    }
    if (m == -std::numeric_limits<S>::infinity()) {  // nothing but -inf and NaN: adds no mass
      for (int64_t i = 0; i < n; ++i) st.has_nan |= kDirect && i < nv ? load1(x + b0 + i) != load1(x + b0 + i) : zbuf[i] != zbuf[i];
      continue;
    }
    // Pad the tail with -inf (exp gives 0) so the exponentials are all vector work.
    const int64_t padded = (n + W - 1) / W * W;
    for (int64_t i = kMaskedTail ? padded : n; i < padded; ++i) zbuf[i] = -std::numeric_limits<S>::infinity();
    // The exponentials touch no memory: fetch the next block meanwhile (one line a step;
    // a prefetch past the row's end is harmless).
    const char* next = reinterpret_cast<const char*>(x + b0 + n);
    R vs = splat(S(0));
    for (int64_t i = 0; i < padded; i += W) {
      __builtin_prefetch(next + i / W * 64);
      R z;
      if (kDirect && i < nv) z = loadv(x + b0 + i); else std::memcpy(&z, zbuf + i, sizeof z);
      vs += vexp<kPreciseExp<T>>(z - m);
    }
    const S s = hsum(vs);
    PieceStats block;
    block.max = m;
    block.sumexp = s;
    merge_stats(st, block);
  }
  // Field by field: a struct copy would read st back with wide loads across the narrow
  // stores just made (a store-forwarding stall that cost a third of a 10-class row).
  out->max = st.max;
  out->sumexp = st.sumexp;
  out->sum_wz = double(hsum(acc_wz)) + double(tail_wz);
  out->sum_wyz = double(hsum(acc_wyz)) + double(tail_wyz);
  out->sum_wy = double(hsum(acc_wy)) + double(tail_wy);
  out->has_nan = st.has_nan;
}

// ---- gradient of a piece of a row ----------------------------------------------
template <class T, bool HasW, bool HasY, ZMap M, bool GradY>
void piece_grad_t(const RowConfig& cfg, const T* x, const T* y, T* gx, T* gy, int64_t begin,
                  int64_t end, const GradCoef& k) {
  using S = typename Acc<T>::scalar;
  using R = typename Acc<T>::reg;
  constexpr int W = Acc<T>::W;
  const S* w = static_cast<const S*>(cfg.weight);
  const Transform<S> tf(cfg);
  // lse = lse_hi + lse_lo: z - lse stays exact for large logits (rows around 1e4) in float,
  // and for a shifted row (see GradCoef) lse_hi is its max, lse_lo the log of its sum.
  const bool shifted = k.lse_shift != 0.0;
  const S lse_hi = shifted ? S(k.lse_shift) : S(k.lse);
  const double lse_lo_exact = shifted ? k.lse : k.lse - double(lse_hi);
  const S lse_lo = S(lse_lo_exact);
  const S cp = S(k.coef_p), cw = S(k.coef_w), cwy = S(k.coef_wy), cgy = S(k.coef_grad_y);
  // 16-bit rows take lse_lo into the coefficient, not the exponential (one operation fewer per
  // vector): p = exp(z - lse_hi) * exp(-lse_lo). A small lse_lo (the usual: lse's float
  // rounding) takes a quadratic, within 2e-10 of exp and cheaper for short rows.
  auto exp_neg = [](double lo) { return std::abs(lo) < 0x1p-10 ? 1.0 - lo * (1.0 - 0.5 * lo) : std::exp(-lo); };
  const S cp_vec = kPreciseExp<T> ? cp : S(k.coef_p * exp_neg(lse_lo_exact));

  // gx may alias x (in-place backward): read the target's logit before it is overwritten.
  const bool has_target = k.target >= begin && k.target < end;
  const S x_target = has_target ? S(load1(x + k.target)) : S(0);

  // The gradient of one vector of W classes from their x (and y, w); gy_out: y's gradient.
  auto grad_of = [&](R xv, R yv, R wv, R& gy_out) {
    R slope = splat(S(1));
    const R z = tf.template z_and_slope<M>(xv, slope);
    const R p = kPreciseExp<T> ? vexp<true>((z - lse_hi) - lse_lo) : vexp<false>(z - lse_hi);
    const R sub = HasY ? cw + cwy * yv : splat(cw);
    const R g = p * cp_vec - (HasW ? wv * sub : sub);
    if constexpr (GradY) gy_out = cgy * (HasW ? wv : splat(S(1))) * ((lse_hi - z) + lse_lo);
    return M == ZMap::Identity ? g : g * slope;
  };
  const R zero = splat(S(0));
  R gyv = zero;
  int64_t c = begin;
#if FASTCE_VW == 16
  if constexpr (std::is_same_v<T, bf16> && M == ZMap::Identity && !HasW && !HasY && !GradY) {
    for (; c + 32 <= end; c += 32) {  // 32 per step (see split, store_pair)
      const Pair v = split(load_pair(x + c));
      store_pair(gx + c, grad_of(v.even, zero, zero, gyv), grad_of(v.odd, zero, zero, gyv));
    }
  }
#endif
  for (; c + W <= end; c += W) {
    storev(gx + c, grad_of(loadv(x + c), HasY ? loadv(y + c) : zero, HasW ? loadw(w + c) : zero, gyv));
    if constexpr (GradY) storev(gy + c, gyv);
  }
  if (const int64_t tail = end - c; tail > 0) {
#if FASTCE_VW == 16
    if constexpr (W == 16) {  // masked loads and stores: short rows (C = 10) are all tail
      const int t = int(tail);
      store_first(gx + c, grad_of(load_first(x + c, t), HasY ? load_first(y + c, t) : zero,
                                  HasW ? load_first(w + c, t) : zero, gyv), t);
      if constexpr (GradY) store_first(gy + c, gyv, t);
    } else
#endif
    {
      T xt[W] = {}, yt[W] = {}, gxt[W], gyt[W];
      S wt[W] = {};
      std::memcpy(xt, x + c, tail * sizeof(T));
      if (HasY) std::memcpy(yt, y + c, tail * sizeof(T));
      if (HasW) std::memcpy(wt, w + c, tail * sizeof(S));
      storev(gxt, grad_of(loadv(xt), HasY ? loadv(yt) : zero, HasW ? loadw(wt) : zero, gyv));
      std::memcpy(gx + c, gxt, tail * sizeof(T));
      if constexpr (GradY) {
        storev(gyt, gyv);
        std::memcpy(gy + c, gyt, tail * sizeof(T));
      }
    }
  }
  if (has_target) {  // the target class also loses coef_target (before the slope)
    S slope;
    const S z = tf.template z1_and_slope<M>(x_target, slope);
    const S wt = HasW ? w[k.target] : S(1);
    const S sub = HasY ? cw + cwy * S(load1(y + k.target)) : cw;
    store1(gx + k.target, (sexp((z - lse_hi) - lse_lo) * cp - wt * sub - S(k.coef_target)) * slope);
  }
}

template <class T>
double sum_wy_t(const RowConfig& cfg, const T* y, int64_t begin, int64_t end) {
  using S = typename Acc<T>::scalar;
  using R = typename Acc<T>::reg;
  constexpr int W = Acc<T>::W;
  const S* w = static_cast<const S*>(cfg.weight);
  const int64_t nv = (end - begin) - (end - begin) % W;
  R acc = splat(S(0));
  S tail = 0;
  for (int64_t c = begin; c < begin + nv; c += W) acc += w ? loadv(y + c) * loadw(w + c) : loadv(y + c);
  for (int64_t c = begin + nv; c < end; ++c) tail += S(load1(y + c)) * (w ? w[c] : S(1));
  return double(hsum(acc)) + double(tail);
}

// ---- dtype and option dispatch -------------------------------------------------
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
FASTCE_INLINE void with_zmap(const RowConfig& cfg, F&& f) {
  if (cfg.softcap > 0) f(std::integral_constant<ZMap, ZMap::Cap>{});
  else if (cfg.logit_scale != 1.0) f(std::integral_constant<ZMap, ZMap::Scale>{});
  else f(std::integral_constant<ZMap, ZMap::Identity>{});
}

void piece_stats(const RowConfig& cfg, const void* x, const void* y, int64_t begin, int64_t end,
                 PieceStats* out) {
  with_dtype(cfg.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_flag(cfg.weight != nullptr, [&](auto has_w) {
      with_flag(y != nullptr, [&](auto has_y) {
        with_zmap(cfg, [&](auto map) {
          with_flag(cfg.need_sum_z, [&](auto sum_z) {
            piece_stats_t<T, has_w.value, has_y.value, map.value, sum_z.value>(
                cfg, static_cast<const T*>(x), static_cast<const T*>(y), begin, end, out);
          });
        });
      });
    });
  });
}

void piece_grad(const RowConfig& cfg, const void* x, const void* y, void* gx, void* gy,
                int64_t begin, int64_t end, const GradCoef& k) {
  with_dtype(cfg.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_flag(cfg.weight != nullptr, [&](auto has_w) {
      with_flag(y != nullptr, [&](auto has_y) {
        with_zmap(cfg, [&](auto map) {
          with_flag(gy != nullptr, [&](auto grad_y) {
            if constexpr (grad_y.value && !has_y.value) return;  // no target gradient without y
            else
              piece_grad_t<T, has_w.value, has_y.value, map.value, grad_y.value>(
                  cfg, static_cast<const T*>(x), static_cast<const T*>(y), static_cast<T*>(gx),
                  static_cast<T*>(gy), begin, end, k);
          });
        });
      });
    });
  });
}

double transform_one(const RowConfig& cfg, const void* x, int64_t index) {
  return with_dtype(cfg.dtype, [&](auto* tag) -> double {
    using T = std::remove_pointer_t<decltype(tag)>;
    using S = typename Acc<T>::scalar;
    const Transform<S> tf(cfg);
    const S xv = S(load1(static_cast<const T*>(x) + index));
    return cfg.softcap > 0 ? double(tf.template z1<ZMap::Cap>(xv)) : double(tf.template z1<ZMap::Scale>(xv));
  });
}

double sum_wy(const RowConfig& cfg, const void* y, int64_t begin, int64_t end) {
  return with_dtype(cfg.dtype, [&](auto* tag) -> double {
    using T = std::remove_pointer_t<decltype(tag)>;
    return sum_wy_t<T>(cfg, static_cast<const T*>(y), begin, end);
  });
}

#undef FASTCE_INLINE
}  // namespace

const RowKernels& table() {
  static const RowKernels k{FASTCE_ISA_NAME, &piece_stats, &piece_grad, &transform_one, &sum_wy};
  return k;
}

}  // namespace fastce::cpu::FASTCE_ISA
