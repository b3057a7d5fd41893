// CPU backend: validates targets, splits the rows into fixed pieces, runs the SIMD
// row kernels over them with at::parallel_for (OpenMP), and reduces in a fixed order
// so that results are bitwise identical for every thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../backward_ops.h"
#include "../cross_entropy.h"
#include "driver.h"
#include "grad_buffer.h"

namespace fastce {
namespace {

using cpu::kMinChunk;

// Per-row view of the problem for the kernels.
struct Rows {
  const Problem& p;
  const Options& opt;
  cpu::RowConfig cfg;
  const cpu::RowKernels& k;
  const char* x;
  int64_t x_stride;  // bytes between rows
  const char* y = nullptr;
  int64_t y_stride = 0;
  std::vector<int64_t> target;  // class of each row, -1 when ignored (class-index targets)
  std::vector<double> row_weight;  // weight of the row's loss (0 when ignored)
  double total_weight = 0.0;       // the mean's divisor
  double weight_sum = 0.0;         // sum of all class weights

  Rows(const Problem& prob, const Options& o)
      : p(prob), opt(o), cfg{}, k(cpu::kernels()) {
    const int64_t elem = prob.logits.element_size();
    cfg.dtype = cpu::kernel_dtype(prob.logits.scalar_type());
    cfg.num_classes = prob.classes;
    cfg.logit_scale = o.logit_scale;
    cfg.softcap = o.softcap;
    cfg.weight = prob.weight.defined() ? prob.weight.data_ptr() : nullptr;
    cfg.prob_smoothing = prob.prob ? o.label_smoothing : 0.0;
    cfg.need_sum_z = !prob.prob && o.label_smoothing > 0;
    x = static_cast<const char*>(prob.logits.data_ptr());
    x_stride = prob.logits.stride(0) * elem;
    if (prob.prob) {
      y = static_cast<const char*>(prob.target.data_ptr());
      y_stride = prob.target.stride(0) * elem;
    }
    weight_sum = double(prob.classes);
    if (prob.weight.defined()) {
      weight_sum = 0.0;
      for (int64_t c = 0; c < prob.classes; ++c) weight_sum += class_weight(c);
    }
    read_targets();
  }

  double class_weight(int64_t c) const {
    if (!p.weight.defined()) return 1.0;
    return p.acc_type == at::kDouble ? static_cast<const double*>(cfg.weight)[c]
                                     : double(static_cast<const float*>(cfg.weight)[c]);
  }
  const void* x_row(int64_t r) const { return x + r * x_stride; }
  const void* y_row(int64_t r) const { return y ? y + r * y_stride : nullptr; }
  bool ignored(int64_t r) const { return !p.prob && target[r] < 0; }

  // Validates class indices (before any parallel region) and sums the weights.
  void read_targets() {
    row_weight.assign(p.rows, 1.0);
    if (p.prob) {
      total_weight = double(p.rows);
      return;
    }
    target.resize(p.rows);
    auto read = [&](auto* t) {
      for (int64_t r = 0; r < p.rows; ++r) {
        const int64_t cls = int64_t(t[r]);
        if (cls == opt.ignore_index) {
          target[r] = -1;
          row_weight[r] = 0.0;
          continue;
        }
        TORCH_CHECK_INDEX(cls >= 0 && cls < p.classes, "Target ", cls, " is out of bounds.");
        target[r] = cls;
        row_weight[r] = class_weight(cls);
        total_weight += row_weight[r];
      }
    };
    switch (p.target.scalar_type()) {
      case at::kLong: read(p.target.data_ptr<int64_t>()); break;
      case at::kInt: read(p.target.data_ptr<int32_t>()); break;
      default: read(p.target.data_ptr<uint8_t>()); break;
    }
  }

  int64_t pieces() const { return cpu::pieces_per_row(p.classes); }
  template <class F>
  void for_each_piece(F&& f) const { cpu::for_each_piece(p.rows, p.classes, f); }
};

// Per-row results (computed in double) as a tensor of `dtype` and `shape`.
at::Tensor rows_tensor(const std::vector<double>& v, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fastce_rows", [&] {
    scalar_t* out = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) out[i] = scalar_t(v[i]);
  });
  return t;
}

// The `count` values of a small tensor (per-row gradients, lse, scalars), as doubles.
std::vector<double> read_doubles(const at::Tensor& t, int64_t count, const char* what) {
  TORCH_CHECK(t.numel() == count, what, ": expected ", count, " values, got a tensor of shape ", t.sizes());
  std::vector<double> v(count);
  const at::Tensor c = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "fastce_read", [&] {
    const scalar_t* in = c.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = double(in[i]);
  });
  return v;
}

// Sum in a fixed order (the reduction is deterministic by construction).
double ordered_sum(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

// A row's log-sum-exp, shift + rel. The op's lse output is shift + rel in one float64; where
// its magnitude is 2^19 or more (a row masked with finfo.min, ties at 1e30), float64's spacing
// there (2^-33) starts to show in float64 rows' results, and from about 2^28 even in float
// rows' (the log of the sum is lost entirely at 1e17): such a row keeps shift = max,
// rel = log(sum) apart (the backward recomputes them from the logits), else shift = 0 and
// rel = the lse.
struct RowLse {
  double shift = 0.0, rel = 0.0;
  double full() const { return shift + rel; }
  // lse - z, exact for a shifted row too.
  double minus(double z) const { return shift != 0.0 ? (shift - z) + rel : rel - z; }
};
constexpr double kHugeLse = 524288.0;  // 2^19
bool huge_lse(double lse) { return std::isfinite(lse) && std::abs(lse) >= kHugeLse; }

// The log-sum-exp of a row from its merged statistics (NaN when a logit is NaN or all are -inf).
RowLse row_lse(const cpu::PieceStats& st) {
  const double lse = (st.has_nan || st.max == -INFINITY) ? NAN : st.max + std::log(st.sumexp);
  return huge_lse(lse) ? RowLse{st.max, std::log(st.sumexp)} : RowLse{0.0, lse};
}

// The statistics of each of row r's pieces, into pieces[0 .. rows.pieces()).
void row_piece_stats(const Rows& rows, int64_t r, cpu::PieceStats* pieces) {
  for (int64_t j = 0; j < rows.pieces(); ++j) {
    const int64_t begin = j * cpu::kPiece, end = std::min(rows.p.classes, begin + cpu::kPiece);
    rows.k.piece_stats(rows.cfg, rows.x_row(r), rows.y_row(r), begin, end, &pieces[j]);
  }
}

// The statistics of a row from those of its np pieces, merged left to right.
cpu::PieceStats merge_pieces(const cpu::PieceStats* pieces, int64_t np) {
  cpu::PieceStats merged = pieces[0];
  for (int64_t j = 1; j < np; ++j) cpu::merge_stats(merged, pieces[j]);
  return merged;
}

// What the incoming gradients are divided by: the mean's divisor as the op's total_weight
// output holds it (rounded to the accumulation type). Read from that tensor by the backward
// op and by the forward pass's gradient alike, so that both give the same bits.
double grad_divisor(int64_t reduction, const at::Tensor& total_weight) {
  return reduction == kMean ? read_doubles(total_weight, 1, "total_weight")[0] : 1.0;
}

// sum_c m_c (shift - z_c) over row r in float64, logit by logit, with m_c = w_c (class-index
// targets) or w_c y'_c (probability targets, y' smoothed): for rows with a huge lse only, where
// the kernels' float sums of m_c z_c would cancel against shift * sum_c m_c.
double row_weighted_gap(const Rows& rows, int64_t r, double shift) {
  const double eps = rows.opt.label_smoothing, C = double(rows.p.classes);
  double gap = 0.0;
  for (int64_t c = 0; c < rows.p.classes; ++c) {
    double m = rows.class_weight(c);
    if (rows.p.prob) m = (1.0 - eps) * rows.k.sum_wy(rows.cfg, rows.y_row(r), c, c + 1) + eps / C * m;
    gap += m * (shift - rows.k.transform_one(rows.cfg, rows.x_row(r), c));
  }
  return gap;
}

// Coefficients of the gradient of row r (not ignored) for the incoming gradients g of its
// loss and g_z of its z-loss, both already divided by the mean's divisor.
// sum_wy: probability targets' sum of w_c * y_c over the row.
cpu::GradCoef row_grad_coef(const Rows& rows, int64_t r, double g, double g_z, const RowLse& row_lse,
                            double sum_wy) {
  const double eps = rows.opt.label_smoothing, C = double(rows.p.classes), s = rows.opt.lse_square_scale;
  const double smooth = eps > 0 ? eps / C * rows.weight_sum : 0.0;
  const double lse = row_lse.full();
  cpu::GradCoef k{};
  k.lse_shift = row_lse.shift;
  k.lse = row_lse.rel;
  k.coef_w = eps > 0 ? g * eps / C : 0.0;
  if (rows.p.prob) {
    k.coef_p = g * ((1.0 - eps) * sum_wy + smooth) + 2.0 * s * lse * (g + g_z);
    k.coef_wy = g * (1.0 - eps);
    k.coef_grad_y = g * (1.0 - eps);
    k.target = -1;
  } else {
    const double w_r = rows.row_weight[r];
    k.coef_p = g * ((1.0 - eps) * w_r + smooth) + 2.0 * s * w_r * lse * (g + g_z);
    k.target = rows.target[r];
    k.coef_target = g * (1.0 - eps) * w_r;
  }
  return k;
}

// Where a gradient is written: gx (and gy for probability targets), rows `stride` bytes apart.
struct GradOut {
  char* gx = nullptr;
  char* gy = nullptr;
  int64_t gx_stride = 0, gy_stride = 0, elem = 0;
  GradOut(at::Tensor* gx2d, at::Tensor* gy2d) {
    if (!gx2d) return;
    elem = gx2d->element_size();
    gx = static_cast<char*>(gx2d->data_ptr());
    gx_stride = gx2d->stride(0) * elem;
    if (gy2d) {
      gy = static_cast<char*>(gy2d->data_ptr());
      gy_stride = gy2d->stride(0) * elem;
    }
  }
  // Writes the gradient of x[begin, end) of row r; ignored rows get zeros.
  void write(const Rows& rows, int64_t r, int64_t begin, int64_t end, const cpu::GradCoef* coef) const {
    char* gx_row = gx + r * gx_stride;
    if (!coef) {
      std::memset(gx_row + begin * elem, 0, (end - begin) * elem);
      return;
    }
    rows.k.piece_grad(rows.cfg, rows.x_row(r), rows.y_row(r), gx_row, gy ? gy + r * gy_stride : nullptr,
                      begin, end, *coef);
  }
};

// The probability targets' sum of w_c * y_c of row r (0 for class-index targets).
double row_sum_wy(const Rows& rows, int64_t r) {
  return rows.p.prob ? rows.k.sum_wy(rows.cfg, rows.y_row(r), 0, rows.p.classes) : 0.0;
}

void backward_into(const at::Tensor& grad_loss, const at::Tensor& grad_zloss, const Problem& p,
                   const Options& opt, const at::Tensor& lse_t, const at::Tensor& total_weight,
                   at::Tensor& gx2d, at::Tensor* gy2d);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    std::optional<double> softcap, double lse_square_scale, bool /*inplace_backward*/,
    bool compute_grad, double grad_scale) {
  const Options opt = make_options(reduction, ignore_index, label_smoothing, logit_scale, softcap,
                                   lse_square_scale);
  const Problem p = prepare(input, target, weight, opt);
  const Rows rows(p, opt);
  const int64_t np = rows.pieces();

  // Row r's loss, z-loss and lse from its pieces' statistics; returns the lse.
  const double eps = opt.label_smoothing, C = double(p.classes), s = opt.lse_square_scale;
  std::vector<cpu::PieceStats> stats(p.rows * np);
  std::vector<double> loss(p.rows, 0.0), zloss(p.rows, 0.0), lse(p.rows, 0.0);  // 0: ignored rows
  auto finish_row = [&](int64_t r) {
    cpu::PieceStats merged;
    if (np > 1) merged = merge_pieces(&stats[r * np], np);
    const cpu::PieceStats& st = np > 1 ? merged : stats[r * np];  // no copy: see piece_stats_t
    const RowLse row = row_lse(st);
    const double l = row.full();
    // sum_c m_c (lse - z_c) from sum_m = sum_c m_c and sum_mz = sum_c m_c z_c (see row_weighted_gap)
    auto weighted_lse_minus_z = [&](double sum_m, double sum_mz) {
      return row.shift != 0.0 ? row_weighted_gap(rows, r, row.shift) + row.rel * sum_m : l * sum_m - sum_mz;
    };
    double ce;
    if (p.prob) {
      // loss = sum_c w_c y'_c (lse - z_c) with y' = (1 - eps) y + eps / C
      ce = weighted_lse_minus_z(st.sum_wy, st.sum_wyz);  // the kernel folded the smoothing into y
    } else {
      const double w_t = rows.row_weight[r];
      const double z_t = rows.k.transform_one(rows.cfg, rows.x_row(r), rows.target[r]);
      ce = (1.0 - eps) * w_t * row.minus(z_t);
      if (eps > 0) ce += eps / C * weighted_lse_minus_z(rows.weight_sum, st.sum_wz);
    }
    zloss[r] = s > 0 ? s * rows.row_weight[r] * l * l : 0.0;
    loss[r] = ce + zloss[r];
    lse[r] = l;
    return row;
  };

  // compute_grad: the gradient for grad_loss = grad_scale and grad_z_loss = 0. With enough rows to
  // balance the threads, a task is a whole row: its statistics, loss, then gradient while
  // the row is still in cache. Few long rows are split into pieces (for_each_piece), and get
  // their gradient after the pieces' statistics are merged.
  const at::Tensor total_weight_out = rows_tensor({rows.total_weight}, {}, p.acc_type);
  at::Tensor gx2d;
  if (compute_grad) gx2d = cpu::new_grad_buffer(p.rows, p.classes, input.options());
  const bool grad_in_pass =
      compute_grad && p.classes > 0 && (np == 1 || p.rows >= 4 * at::get_num_threads());
  if (grad_in_pass) {
    const GradOut out(&gx2d, nullptr);
    const double div = grad_divisor(reduction, total_weight_out);
    const double g = grad_scale / div, g_z = 0.0 / div;  // as the backward op computes them
    const int64_t grain = std::max<int64_t>(1, kMinChunk / std::max<int64_t>(1, p.classes));
    at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        if (rows.ignored(r)) {
          out.write(rows, r, 0, p.classes, nullptr);
          continue;
        }
        row_piece_stats(rows, r, &stats[r * np]);
        const cpu::GradCoef k = row_grad_coef(rows, r, g, g_z, finish_row(r), row_sum_wy(rows, r));
        out.write(rows, r, 0, p.classes, &k);
      }
    });
  } else {
    rows.for_each_piece([&](int64_t task, int64_t r, int64_t begin, int64_t end) {
      if (!rows.ignored(r)) rows.k.piece_stats(rows.cfg, rows.x_row(r), rows.y_row(r), begin, end, &stats[task]);
    });
    at::parallel_for(0, p.rows, std::max<int64_t>(1, 4096 / np), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        if (!rows.ignored(r)) finish_row(r);
    });
  }

  const auto dtype = input.scalar_type();
  at::Tensor loss_out, zloss_out;
  if (reduction == kNone) {
    loss_out = rows_tensor(loss, p.row_shape, dtype);
    zloss_out = rows_tensor(zloss, p.row_shape, dtype);
  } else {
    // torch's mean is (weighted sum) / (total weight); with nothing to average it is 0/0 = NaN
    const double div = reduction == kMean ? rows.total_weight : 1.0;
    const double nan_if_empty = reduction == kMean && rows.total_weight == 0.0 ? NAN : 0.0;
    loss_out = rows_tensor({ordered_sum(loss) / div + nan_if_empty}, {}, dtype);
    zloss_out = rows_tensor({ordered_sum(zloss) / div + nan_if_empty}, {}, dtype);
  }
  const at::Tensor lse_out = rows_tensor(lse, p.row_shape, at::kDouble);
  if (!compute_grad) return {loss_out, zloss_out, lse_out, total_weight_out, at::empty({0}, input.options())};
  if (!grad_in_pass) {  // few rows of several pieces: their lse is known only now
    const int64_t n_grad = reduction == kNone ? p.rows : 1;
    backward_into(at::full({n_grad}, grad_scale, at::kDouble), at::zeros({n_grad}, at::kDouble), p, opt, lse_out,
                  total_weight_out, gx2d, nullptr);
  }
  return {loss_out, zloss_out, lse_out, total_weight_out, grad_to_input_layout(gx2d, input)};
}

// Writes the gradient of the logits (and of probability targets) into gx2d / gy2d.
void backward_into(const at::Tensor& grad_loss, const at::Tensor& grad_zloss, const Problem& p,
                   const Options& opt, const at::Tensor& lse_t, const at::Tensor& total_weight,
                   at::Tensor& gx2d, at::Tensor* gy2d) {
  const Rows rows(p, opt);
  const bool per_row = opt.reduction == kNone;
  const double div = grad_divisor(opt.reduction, total_weight);
  const int64_t n_grad = per_row ? p.rows : 1;
  const std::vector<double> gl = read_doubles(grad_loss, n_grad, "grad_loss");
  const std::vector<double> gz = read_doubles(grad_zloss, n_grad, "grad_z_loss");
  const std::vector<double> lse_rows = read_doubles(lse_t, p.rows, "lse");
  // A row whose lse is huge (see RowLse) gets its max and log-sum again from the logits,
  // before any gradient is written (in place, over them); the others' lse is the saved one.
  std::vector<int64_t> huge_rows;
  for (int64_t r = 0; r < p.rows; ++r)
    if (!rows.ignored(r) && huge_lse(lse_rows[r])) huge_rows.push_back(r);
  std::vector<RowLse> recomputed(huge_rows.empty() ? 0 : p.rows);  // by row, for huge rows only
  at::parallel_for(0, int64_t(huge_rows.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<cpu::PieceStats> pieces(rows.pieces());
    for (int64_t i = b; i < e; ++i) {
      row_piece_stats(rows, huge_rows[i], pieces.data());
      recomputed[huge_rows[i]] = row_lse(merge_pieces(pieces.data(), rows.pieces()));
    }
  });
  auto lse_of = [&](int64_t r) {
    return recomputed.empty() || !huge_lse(lse_rows[r]) ? RowLse{0.0, lse_rows[r]} : recomputed[r];
  };

  std::vector<double> sum_wy;
  if (p.prob) {
    sum_wy.resize(p.rows);
    at::parallel_for(0, p.rows, std::max<int64_t>(1, kMinChunk / std::max<int64_t>(1, p.classes)),
                     [&](int64_t b, int64_t e) {
                       for (int64_t r = b; r < e; ++r) sum_wy[r] = row_sum_wy(rows, r);
                     });
  }

  const GradOut out(&gx2d, gy2d);
  rows.for_each_piece([&](int64_t, int64_t r, int64_t begin, int64_t end) {
    if (rows.ignored(r)) return out.write(rows, r, begin, end, nullptr);
    const int64_t i = per_row ? r : 0;
    const cpu::GradCoef k = row_grad_coef(rows, r, gl[i] / div, gz[i] / div, lse_of(r),
                                          p.prob ? sum_wy[r] : 0.0);
    out.write(rows, r, begin, end, &k);
  });
}

struct CpuBackend {
  static at::Tensor new_grad_buffer(int64_t rows, int64_t classes, const at::TensorOptions& options) {
    return cpu::new_grad_buffer(rows, classes, options);
  }
  static void backward_into(const at::Tensor& grad_loss, const at::Tensor& grad_zloss,
                            const at::Tensor& /*input*/, const Problem& p, const Options& opt,
                            const at::Tensor& lse, const at::Tensor& total_weight, at::Tensor& gx2d,
                            at::Tensor* gy2d) {
    fastce::backward_into(grad_loss, grad_zloss, p, opt, lse, total_weight, gx2d, gy2d);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastce, CPU, m) {
  m.impl("cross_entropy_forward", &forward_cpu);
  m.impl("cross_entropy_backward", &backward_op<CpuBackend>);
  m.impl("cross_entropy_backward_inplace", &backward_inplace_op<CpuBackend>);
}

}  // namespace fastce
