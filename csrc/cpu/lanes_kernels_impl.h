// The lanes kernels (lanes_kernels.h), written once with GCC vector extensions and compiled once
// per instruction set, like the row kernels: the including file (lanes_kernels_generic.cpp,
// lanes_kernels_x86.h) defines FASTCE_ISA, FASTCE_ISA_NAME, FASTCE_VW, FASTCE_F16C and optionally
// FASTCE_BF16_CVT, includes simd_impl.h, then this file.
//
// A vector holds W rows (positions). For each vector, three passes over the classes: the max of
// z, then the sum of exp(z - max) with the sums the loss needs, then the gradient. A spatial
// vector's classes are read from memory each pass (a position's classes stay in L1/L2 between
// passes); a tiled vector's are gathered into a (classes x W) tile once. The numerical rules are
// rules.h's forms for vectors of rows (class_loss_lanes, grad_coef_lanes, ...).

namespace fastce::cpu::FASTCE_ISA {
namespace {

// Rows of at most this many classes keep their exponentials exp(z - shift) from the second pass
// for the third, p = e / sum (one exponential per logit instead of two).
constexpr int64_t kKeptExpClasses = 256;

// log(s) for a row's sum of exponentials: s >= 1, or 0 (a row of -inf: -inf), NaN or +inf (kept).
// s = 2^e f with f in [sqrt(1/2), sqrt(2)), log(f) = log(1 + x) from a degree-9 polynomial in x
// (about 1 ulp), ln2 in two parts so that e ln2 adds no rounding.
FASTCE_INLINE vf vlog(vf s) {
  const vu bits = (vu)s;
  vi e = (vi)(bits >> 23) - 126;
  vf f = (vf)((bits & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  const vi low = f < 0.70710678118654752f;
  e = low ? e - 1 : e;
  f = low ? f + f : f;
  const vf x = f - 1.0f;
  const vf x2 = x * x;
  vf q = splat(7.0376836292e-2f);
  q = q * x - 1.1514610310e-1f;
  q = q * x + 1.1676998740e-1f;
  q = q * x - 1.2420140846e-1f;
  q = q * x + 1.4249322787e-1f;
  q = q * x - 1.6668057665e-1f;
  q = q * x + 2.0000714765e-1f;
  q = q * x - 2.4999993993e-1f;
  q = q * x + 3.3333331174e-1f;
  const vf ef = __builtin_convertvector(e, vf);
  vf r = q * x * x2 + ef * -2.12194440e-4f - 0.5f * x2;
  r = (x + r) + ef * 0.693359375f;
  r = s == 0.0f ? splat(-std::numeric_limits<float>::infinity()) : r;
  return s != s || s == std::numeric_limits<float>::infinity() ? s : r;
}
FASTCE_INLINE double vlog(double s) { return std::log(s); }

typedef double vd __attribute__((vector_size(VW * 8)));

// The loss is computed in double lanes (as the row rules are, in double): a row's sums of
// w_c (shift - z_c) overflow float where its logits are huge (masked with finfo.min).
typedef int64_t vl __attribute__((vector_size(VW * 8)));
FASTCE_INLINE vd to_d(vf v) { return __builtin_convertvector(v, vd); }
FASTCE_INLINE double to_d(double v) { return v; }
FASTCE_INLINE vl to_d_mask(vi m) { return __builtin_convertvector(m, vl); }
FASTCE_INLINE bool to_d_mask(int32_t m) { return m != 0; }
FASTCE_INLINE double dsum(vd v) {
  double s = 0.0;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}
FASTCE_INLINE double dsum(double v) { return v; }
FASTCE_INLINE void store_d(double* p, int n, vd v) { std::memcpy(p, &v, n * sizeof(double)); }
FASTCE_INLINE void store_d(double* p, int, double v) { *p = v; }

// The first n lanes of a + b, each summed in double, stored at p.
FASTCE_INLINE void store_doubles(double* p, int n, vf a, vf b) {
  const vd d = __builtin_convertvector(a, vd) + __builtin_convertvector(b, vd);
  std::memcpy(p, &d, n * sizeof(double));
}
FASTCE_INLINE void store_doubles(double* p, int, double a, double b) { *p = a + b; }

template <class S> struct LaneInts { using type = vi; };   // an int32 per float lane
template <> struct LaneInts<double> { using type = int32_t; };

// W values from n <= W doubles (zeros after them), as the accumulation type.
FASTCE_INLINE vf load_doubles(const double* p, int n) {
  double t[VW] = {};
  std::memcpy(t, p, n * sizeof(double));
  vd d;
  std::memcpy(&d, t, sizeof d);
  return __builtin_convertvector(d, vf);
}
FASTCE_INLINE double load_doubles_as(double*, const double* p, int) { return *p; }
FASTCE_INLINE vf load_doubles_as(float*, const double* p, int n) { return load_doubles(p, n); }

template <class T, bool Tiled>
SpanSums span_t(const LanesConfig& cfg, const Span& sp) {
  using S = typename Acc<T>::scalar;
  using R = typename Acc<T>::reg;
  using RI = typename LaneInts<S>::type;
  constexpr int W = Acc<T>::W;
  constexpr bool kP = kPreciseExp<T>;
  const int64_t C = cfg.classes;
  const S* w = static_cast<const S*>(cfg.weight);
  RowConfig rc{};
  rc.logit_scale = cfg.logit_scale;
  rc.softcap = cfg.softcap;
  const Transform<S> tf(rc);
  const bool capped = cfg.softcap > 0, sloped = capped || cfg.logit_scale != 1.0;
  auto z_of = [&](R xv) { return capped ? tf.template z<ZMap::Cap>(xv) : tf.template z<ZMap::Scale>(xv); };
  auto z_and_slope = [&](R xv, R& slope) {
    return capped ? tf.template z_and_slope<ZMap::Cap>(xv, slope) : tf.template z_and_slope<ZMap::Scale>(xv, slope);
  };

  const T* x = static_cast<const T*>(sp.x);
  const T* y = static_cast<const T*>(sp.y);
  T* gx = static_cast<T*>(sp.gx);
  T* gy = static_cast<T*>(sp.gy);
  const bool prob = cfg.prob;
  const SmoothedTarget<S> smooth_y = smoothed_target<S>(prob ? cfg.eps : 0.0, C);
  const bool smoothing = !prob && cfg.eps > 0 && cfg.weight_sum != 0;
  const S eps = S(cfg.eps), vocab = S(cfg.vocab), wsum = S(cfg.weight_sum), lss = S(cfg.lse_square_scale);
  const R zero = splat(S(0)), one = splat(S(1)), neg_inf = splat(-std::numeric_limits<S>::infinity());
  RI lane_index{};
  if constexpr (W > 1)
    for (int i = 0; i < W; ++i) lane_index[i] = i;

  constexpr int64_t kTile = Tiled ? kMaxTiledClasses * W : 1;
  alignas(64) S xt[kTile], yt[Tiled ? kTile : 1], gt[kTile], gyt[kTile];
  alignas(64) S et[kKeptExpClasses * W];
  const bool keep_exp = C <= kKeptExpClasses && sp.gx != nullptr;

  using D = decltype(to_d(R{}));  // double lanes
  const D zero_d{};
  D loss_acc = zero_d, z_acc = zero_d;  // lane by lane over the span
  for (int64_t p0 = 0; p0 < sp.n; p0 += W) {
    const int nv = int(std::min<int64_t>(W, sp.n - p0));
    if constexpr (Tiled) {  // rows p0.., class c -> tile[c * W + lane]; missing lanes hold 0
      for (int i = 0; i < W; ++i)
        for (int64_t c = 0; c < C; ++c) {
          xt[c * W + i] = i < nv ? S(load1(x + (p0 + i) * cfg.x_row + c * cfg.x_class)) : S(0);
          if (y) yt[c * W + i] = i < nv ? S(load1(y + (p0 + i) * cfg.y_row + c * cfg.y_class)) : S(0);
        }
    }
    // Class c of the vector's rows (spatial: consecutive positions; the missing ones read as 0).
    auto load_at = [&](const T* base, const S* tile, int64_t c, int64_t class_stride) -> R {
      if constexpr (Tiled) {
        return loadv(tile + c * W);
      } else {
        const T* p = base + c * class_stride + p0;
        if (nv == W) return loadv(p);
        T tmp[W] = {};
        std::memcpy(tmp, p, nv * sizeof(T));
        return loadv(tmp);
      }
    };
    auto load_x = [&](int64_t c) { return load_at(x, xt, c, cfg.x_class); };
    auto load_y = [&](int64_t c) { return load_at(y, yt, c, cfg.y_class); };
    auto store_at = [&](T* base, S* tile, int64_t c, int64_t class_stride, R v) {
      if constexpr (Tiled) {
        storev(tile + c * W, v);
      } else {
        T* p = base + c * class_stride + p0;
        if (nv == W) return storev(p, v);
        T tmp[W];
        storev(tmp, v);
        std::memcpy(p, tmp, nv * sizeof(T));
      }
    };

    RI valid, target;
    if constexpr (W > 1) valid = lane_index < nv; else valid = true;
    if (!prob) {
      int32_t t[W];
      for (int i = 0; i < W; ++i) t[i] = i < nv ? sp.target[p0 + i] : -1;
      std::memcpy(&target, t, sizeof target);
    }

    // Pass 1: the max. A row of -inf keeps shift 0 (its sum is then 0, its lse -inf, as RowLse's).
    R m = neg_inf;
    for (int64_t c = 0; c < C; ++c) {
      if constexpr (!Tiled) __builtin_prefetch(x + c * cfg.x_class + p0 + 512 / sizeof(T));
      m = vmax(m, z_of(load_x(c)));
    }
    const R shift = m == neg_inf ? zero : m;

    // Pass 2: the sum of exponentials, and what the loss needs besides.
    R s = zero, z_t = zero, w_t = one, sum_wy = zero, sum_wy_raw = zero;
    const D shift_d = to_d(shift);
    D gap = zero_d, gap_y = zero_d;
    for (int64_t c = 0; c < C; ++c) {
      const R z = z_of(load_x(c));
      const R e = vexp<kP>(z - shift);
      if (keep_exp) storev(et + c * W, e);
      s += e;
      const R wc = w ? splat(w[c]) : one;
      if (!prob) {
        const auto hit = target == int32_t(c);
        z_t = hit ? z : z_t;
        if (w) w_t = hit ? wc : w_t;
        if (smoothing) gap += to_d(wc) * (shift_d - to_d(z));
      } else {
        const R yc = load_y(c);
        const R wy = (yc * smooth_y.keep + smooth_y.add) * wc;
        sum_wy += wy;
        gap_y += to_d(wy) * (shift_d - to_d(z));
        sum_wy_raw += yc * wc;
      }
    }
    const R rel = vlog(s);
    const R lse = shift + rel;
    const auto here = prob ? valid : target >= 0;  // rows whose loss counts
    const R w_r = prob ? one : R(here ? w_t : zero);
    const D rel_d = to_d(rel), lse_d = shift_d + rel_d, w_r_d = to_d(w_r);
    D ce;
    if (!prob) {
      ce = class_loss_lanes(w_r_d, lse_minus_lanes(shift_d, rel_d, to_d(z_t)),
                            weighted_lse_minus_z_lanes(rel_d, zero_d + cfg.weight_sum, gap), cfg.eps, cfg.vocab,
                            smoothing);
    } else {
      ce = weighted_lse_minus_z_lanes(rel_d, to_d(sum_wy), gap_y);
    }
    const auto here_d = to_d_mask(here);
    const D zl = lss > 0 ? D(here_d ? z_loss_lanes(cfg.lse_square_scale, lse_d) : zero_d) : zero_d;
    const D loss = here_d ? ce + zl : zero_d;
    loss_acc += loss;
    z_acc += zl;
    if (sp.lse) store_doubles(sp.lse + p0, nv, here ? shift : zero, here ? rel : zero);
    if (sp.loss) store_d(sp.loss + p0, nv, loss);
    if (sp.z_loss) store_d(sp.z_loss + p0, nv, zl);
    if (!gx) continue;

    // Pass 3: the gradient, written in the logits' layout (rows that count nothing get 0).
    S* no_tile = nullptr;
    const R g = sp.g ? load_doubles_as(no_tile, sp.g + p0, nv) : splat(S(sp.g_all));
    const R g_z = sp.g_z ? load_doubles_as(no_tile, sp.g_z + p0, nv) : splat(S(sp.g_z_all));
    const GradCoefLanes<R> k =
        grad_coef_lanes(lse, g, g_z, prob, prob ? sum_wy_raw : w_r, eps, vocab, wsum, lss);
    const R inv_s = one / s;
    for (int64_t c = 0; c < C; ++c) {
      R slope = one;
      const R z = z_and_slope(load_x(c), slope);
      // p = softmax(z) = exp(z - lse) = exp(z - shift) / sum
      const R p = keep_exp ? loadv(et + c * W) * inv_s : vexp<kP>((z - shift) - rel);
      const R wc = w ? splat(w[c]) : one;
      R yc = zero;
      if (prob) yc = load_y(c);
      const R sub = prob ? k.coef_w + k.coef_wy * yc : k.coef_w;
      R gr = p * k.coef_p - wc * sub;
      if (!prob) gr -= target == int32_t(c) ? k.coef_target : zero;
      if (sloped) gr *= slope;
      store_at(gx, gt, c, cfg.gx_class, here ? gr : zero);
      if (gy) store_at(gy, gyt, c, cfg.gy_class, here ? k.coef_grad_y * wc * lse_minus_lanes(shift, rel, z) : zero);
    }
    if constexpr (Tiled) {  // the tile back to the rows
      for (int i = 0; i < nv; ++i)
        for (int64_t c = 0; c < C; ++c) {
          store1(gx + (p0 + i) * cfg.gx_row + c * cfg.gx_class, gt[c * W + i]);
          if (gy) store1(gy + (p0 + i) * cfg.gy_row + c * cfg.gy_class, gyt[c * W + i]);
        }
    }
  }
  return {dsum(loss_acc), dsum(z_acc)};
}

SpanSums span(const LanesConfig& cfg, const Span& sp) {
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return cfg.tiled ? span_t<T, true>(cfg, sp) : span_t<T, false>(cfg, sp);
  };
  switch (cfg.dtype) {
    case Dtype::Float64: return run(static_cast<double*>(nullptr));
    case Dtype::BFloat16: return run(static_cast<bf16*>(nullptr));
    case Dtype::Float16: return run(static_cast<f16*>(nullptr));
    default: return run(static_cast<float*>(nullptr));
  }
}

#undef FASTCE_INLINE
}  // namespace

const LanesKernels& lanes_table() {
  static const LanesKernels k{FASTCE_ISA_NAME, &span};
  return k;
}

}  // namespace fastce::cpu::FASTCE_ISA
