// The CPU driver of the lanes kernels: cuts a spatial problem or rows of few classes into fixed
// spans (so that sums, taken span by span in order, are the same for every thread count), reads
// the targets span by span, and runs the kernels in parallel. See lanes.h for the choice of path.
#include "lanes.h"

#include <algorithm>
#include <vector>

#include "driver.h"
#include "grad_buffer.h"
#include "lanes_kernels.h"

namespace fastce::cpu {

bool takes_lanes(const Problem& p, const LossOptions& opt) {
  if (opt.vocab_size >= 0) return false;
  return p.spatial || (p.classes >= 1 && p.classes <= kFewClasses);
}

namespace {

constexpr int32_t kIgnoredTarget = -1;

// A tensor seen as the kernels address it: its first element and its strides in elements
// between rows (positions) and classes, and, for a spatial problem, between samples.
struct Layout {
  char* data;
  int64_t sample, row, cls;
};

Layout layout_of(const Problem& p, const Tensor& t) {
  char* data = static_cast<char*>(const_cast<void*>(t.const_data_ptr()));
  if (!p.spatial) return {data, 0, t.stride(0), p.classes > 1 ? t.stride(1) : 1};
  if (t.dim() == 3) return {data, t.stride(0), 1, t.stride(1)};  // the problem's (N, C, inner) view
  return {data, p.classes * p.inner, 1, p.inner};                // a buffer of the input's shape
}

// The problem's rows cut into spans: spatial spans never cross samples.
struct Spans {
  const Problem& p;
  int64_t per_sample, count;
  explicit Spans(const Problem& prob) : p(prob) {
    const int64_t len = p.spatial ? p.inner : p.rows;
    per_sample = (len + kSpan - 1) / kSpan;
    count = p.spatial ? (p.rows / std::max<int64_t>(p.inner, 1)) * per_sample : per_sample;
  }
  // Span j's first row, its sample and first position in it (rows: sample 0), and its length.
  struct At {
    int64_t row, sample, pos, n;
  };
  At at(int64_t j) const {
    if (!p.spatial) return {j * kSpan, 0, j * kSpan, std::min(kSpan, p.rows - j * kSpan)};
    const int64_t sample = j / per_sample, pos = (j % per_sample) * kSpan;
    return {sample * p.inner + pos, sample, pos, std::min(kSpan, p.inner - pos)};
  }
  template <class F>
  void run(const F& f) const {
    const int64_t grain = std::max<int64_t>(1, kMinChunk / (kSpan * std::max<int64_t>(p.classes, 1)));
    parallel_rows(count, grain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) f(j, at(j));
    });
  }
};

// Class-index targets: reads them span by span (int64, int32 or uint8).
struct Targets {
  const Problem& p;
  const LossOptions& opt;
  Targets(const Problem& prob, const LossOptions& o) : p(prob), opt(o) {}

  template <class F>
  auto with_type(F&& f) const {
    switch (p.target.scalar_type()) {
      case ScalarType::Long: return f(p.target.const_data_ptr<int64_t>());
      case ScalarType::Int: return f(p.target.const_data_ptr<int32_t>());
      default: return f(p.target.const_data_ptr<uint8_t>());
    }
  }
  double class_weight(int64_t c) const {
    if (!p.weight.has_value()) return 1.0;
    return p.acc_type == ScalarType::Double ? p.weight->const_data_ptr<double>()[c]
                                            : double(p.weight->const_data_ptr<float>()[c]);
  }
  // Rows [row, row + n) as kernel targets (kIgnoredTarget where ignored); they were validated.
  void fill(int64_t row, int64_t n, int32_t* out) const {
    with_type([&](const auto* t) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t cls = int64_t(t[row + i]);
        out[i] = cls == opt.ignore_index ? kIgnoredTarget : int32_t(cls);
      }
    });
  }
  // Validates every target (torch's error names the first bad one) and returns the mean's
  // divisors: the sum of the non-ignored rows' weights and their count (summed span by span,
  // in order).
  Divisors validate_and_weigh(const Spans& spans) const {
    std::vector<double> weight(spans.count, 0.0), counted(spans.count, 0.0);
    std::vector<char> bad(spans.count, 0);
    const uint64_t C = uint64_t(p.classes);
    spans.run([&](int64_t j, const Spans::At& a) {
      with_type([&](const auto* t) {
        // Branch-free (the compiler vectorizes it): a bad target is looked for only once seen.
        bool any_bad = false;
        double sum = 0.0;
        if (!p.weight.has_value()) {
          int64_t count = 0;
          for (int64_t i = 0; i < a.n; ++i) {
            const int64_t cls = int64_t(t[a.row + i]);
            const bool counted = cls != opt.ignore_index;
            any_bad |= counted & (uint64_t(cls) >= C);
            count += counted;
          }
          sum = double(count);
          counted[j] = sum;
        } else {
          int64_t count = 0;
          for (int64_t i = 0; i < a.n; ++i) {
            const int64_t cls = int64_t(t[a.row + i]);
            const bool counts = cls != opt.ignore_index, in = uint64_t(cls) < C;
            any_bad |= counts & !in;
            sum += counts && in ? class_weight(cls) : 0.0;
            count += counts;
          }
          counted[j] = double(count);
        }
        weight[j] = sum;
        bad[j] = any_bad;
      });
    });
    Divisors total{0.0, 0.0};
    for (int64_t j = 0; j < spans.count; ++j) {
      if (bad[j]) throw_first_bad(spans.at(j));
      total.ce += weight[j];
      total.z += counted[j];
    }
    return total;
  }
  [[noreturn]] void throw_first_bad(const Spans::At& a) const {
    const int64_t cls = with_type([&](const auto* t) {
      for (int64_t i = 0; i < a.n; ++i) {
        const int64_t c = int64_t(t[a.row + i]);
        if (c != opt.ignore_index && (c < 0 || c >= p.classes)) return c;
      }
      return int64_t(-1);
    });
    fail(Error::Index, "Target ", cls, " is out of bounds.");
  }
};

// The kernels' configuration for this problem, its logits x and probability targets y; the
// gradients' strides are set by the caller.
LanesConfig config(const Problem& p, const LossOptions& opt, const Layout& x, const Layout* y) {
  LanesConfig cfg{};
  cfg.dtype = kernel_dtype(p.dtype);
  cfg.classes = p.classes;
  cfg.tiled = !p.spatial;
  cfg.x_row = x.row;
  cfg.x_class = x.cls;
  if (y) {
    cfg.y_row = y->row;
    cfg.y_class = y->cls;
  }
  cfg.logit_scale = opt.logit_scale;
  cfg.softcap = opt.softcap;
  cfg.weight = p.weight.has_value() ? p.weight->const_data_ptr() : nullptr;
  cfg.eps = opt.label_smoothing;
  cfg.vocab = double(vocabulary(opt, p.classes));
  cfg.weight_sum = double(p.classes);
  if (cfg.weight) {
    const Targets t(p, opt);
    cfg.weight_sum = 0.0;
    for (int64_t c = 0; c < p.classes; ++c) cfg.weight_sum += t.class_weight(c);
  }
  cfg.lse_square_scale = opt.lse_square_scale;
  cfg.prob = p.prob;
  return cfg;
}

// One pass of the kernels over every span. out: optional per-row outputs (lse, loss, z_loss),
// g / g_z per row or g_all / g_z_all; returns the loss sums in row order.
struct Pass {
  const Problem& p;
  const LossOptions& opt;
  Layout x, y{}, gx{}, gy{};
  bool has_gx = false, has_gy = false;
  double* lse = nullptr;
  double* loss = nullptr;
  double* z_loss = nullptr;
  const double* g = nullptr;
  const double* g_z = nullptr;
  double g_all = 0.0, g_z_all = 0.0;

  Pass(const Problem& prob, const LossOptions& o) : p(prob), opt(o), x(layout_of(prob, prob.logits)) {
    if (p.prob) y = layout_of(p, p.target);
  }

  SpanSums run() const {
    LanesConfig cfg = config(p, opt, x, p.prob ? &y : nullptr);
    cfg.gx_row = gx.row;
    cfg.gx_class = gx.cls;
    cfg.gy_row = gy.row;
    cfg.gy_class = gy.cls;
    const LanesKernels& k = lanes_kernels_for(kernels().isa);
    const int64_t elem = int64_t(element_size(p.dtype));
    const Spans spans(p);
    const Targets targets(p, opt);
    std::vector<SpanSums> sums(spans.count);
    spans.run([&](int64_t j, const Spans::At& a) {
      int32_t target[kSpan];
      if (!p.prob) targets.fill(a.row, a.n, target);
      auto at = [&](const Layout& l) { return l.data + (a.sample * l.sample + a.pos * l.row) * elem; };
      Span s{};
      s.x = at(x);
      s.y = p.prob ? at(y) : nullptr;
      s.gx = has_gx ? at(gx) : nullptr;
      s.gy = has_gy ? at(gy) : nullptr;
      s.n = a.n;
      s.target = target;
      s.lse = lse ? lse + a.row : nullptr;
      s.loss = loss ? loss + a.row : nullptr;
      s.z_loss = z_loss ? z_loss + a.row : nullptr;
      s.g = g ? g + a.row : nullptr;
      s.g_z = g_z ? g_z + a.row : nullptr;
      s.g_all = g_all;
      s.g_z_all = g_z_all;
      sums[j] = k.span(cfg, s);
    });
    SpanSums total;
    for (const SpanSums& s : sums) {  // in row order: deterministic by construction
      total.loss += s.loss;
      total.z_loss += s.z_loss;
    }
    return total;
  }
};

// The mean's divisors as the op's total_weight output holds them (in its dtype).
Divisors read_divisors(const Tensor& total_weight) {
  const std::vector<double> d = to_doubles(total_weight, 2, "total_weight");
  return {d[0], d[1]};
}

}  // namespace

ForwardResult lanes_forward(const Tensor& input, const Problem& p, const LossOptions& opt, Tensor* gx,
                            ScalarType loss_dtype) {
  const Spans spans(p);
  const Divisors divisors =
      p.prob ? Divisors{double(p.rows), double(p.rows)} : Targets(p, opt).validate_and_weigh(spans);
  ForwardResult out;
  out.total_weight = from_doubles({divisors.ce, divisors.z}, {2}, p.acc_type, input);
  out.lse = new_row_buffer(p.row_shape, ScalarType::Double, input);  // reused memory: no page faults

  Pass pass(p, opt);
  pass.lse = out.lse.mutable_data_ptr<double>();
  std::vector<double> loss, z_loss;  // per row: reduction 'none' only
  if (opt.reduction == kNone) {
    loss.resize(p.rows);
    z_loss.resize(p.rows);
    pass.loss = loss.data();
    pass.z_loss = z_loss.data();
  }
  if (gx) {  // the gradient for grad_loss = 1, grad_z_loss = 0, as the backward op computes it
    const RowGrads g = row_grads(1.0, 0.0, read_divisors(out.total_weight), opt.reduction);
    pass.gx = layout_of(p, *gx);
    pass.has_gx = true;
    pass.g_all = g.ce;
    pass.g_z_all = g.z;
  }
  const SpanSums sums = pass.run();

  if (opt.reduction == kNone) {
    out.loss = from_doubles(loss, p.row_shape, loss_dtype, input);
    out.z_loss = from_doubles(z_loss, p.row_shape, loss_dtype, input);
  } else {
    const Reduced red = reduce_losses(sums.loss, sums.z_loss, divisors, opt.reduction);
    out.loss = from_doubles({red.loss}, {}, loss_dtype, input);
    out.z_loss = from_doubles({red.z_loss}, {}, loss_dtype, input);
  }
  out.grad_input = gx ? grad_to_input_layout(*gx, input) : empty_on(input, {0}, p.dtype);
  return out;
}

void lanes_backward(const BackwardArgs& b, const Problem& p, Tensor& gx, Tensor* gy) {
  const Spans spans(p);
  if (!p.prob) Targets(p, b.opt).validate_and_weigh(spans);
  const bool per_row = b.opt.reduction == kNone;
  const Divisors div = read_divisors(b.total_weight);
  const int64_t n_grad = per_row ? p.rows : 1;
  std::vector<double> gl = to_doubles(b.grad_loss, n_grad, "grad_loss");
  std::vector<double> gz = to_doubles(b.grad_z_loss, n_grad, "grad_z_loss");
  // (The kernels recompute each row's lse from its logits: the saved one is only checked.)
  FASTCE_CHECK(b.lse.numel() == p.rows, "lse: expected ", p.rows, " values, got a tensor of shape ", b.lse.sizes());
  Pass pass(p, b.opt);
  pass.gx = layout_of(p, gx);
  pass.has_gx = true;
  if (gy) {
    pass.gy = layout_of(p, *gy);
    pass.has_gy = true;
  }
  for (int64_t i = 0; i < n_grad; ++i) {  // (in place: gl, gz become the rows' RowGrads)
    const RowGrads g = row_grads(gl[i], gz[i], div, b.opt.reduction);
    gl[i] = g.ce;
    gz[i] = g.z;
  }
  if (per_row) {
    pass.g = gl.data();
    pass.g_z = gz.data();
  } else {
    pass.g_all = gl[0];
    pass.g_z_all = gz[0];
  }
  pass.run();
}

}  // namespace fastce::cpu
