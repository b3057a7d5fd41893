// SIMD row kernels, written once with GCC vector extensions and compiled once per
// instruction set. The including file (row_kernels_generic.cpp, row_kernels_x86.h)
// defines FASTCE_ISA (the namespace), FASTCE_ISA_NAME, FASTCE_VW (float lanes: 4, 8 or
// 16), FASTCE_F16C (hardware half conversions) and, optionally, FASTCE_BF16_CVT
// (AVX512-BF16 conversions), includes the standard headers, then switches the target
// options on around this file.
//
// Accumulation is in float for float/bfloat16/half inputs and in double for double
// inputs (which take the scalar path: W = 1).

#include "simd_impl.h"

namespace fastce::cpu::FASTCE_ISA {
namespace {


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
