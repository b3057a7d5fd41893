// CPU backend: validates targets, splits the rows into fixed pieces, runs the SIMD row
// kernels over them in parallel, and reduces in a fixed order so that results are bitwise
// identical for every thread count. The loss and gradient formulas are those of rules.h.
#include <cmath>
#include <cstring>
#include <vector>

#include "../op_kernels.h"
#include "driver.h"
#include "grad_buffer.h"
#include "lanes.h"

namespace fastce {
namespace {

using cpu::kMinChunk;

// Where a row's target lies: its index in this input's classes, or one of these.
constexpr int64_t kIgnored = -1;
constexpr int64_t kElsewhere = -2;  // in another slice of the vocabulary (vocabulary-parallel)

// Per-row view of the problem for the kernels.
struct Rows {
  const Problem& p;
  const LossOptions& opt;
  cpu::RowConfig cfg;
  const cpu::RowKernels& k;
  const char* x;
  int64_t x_stride;  // bytes between rows
  const char* y = nullptr;
  int64_t y_stride = 0;
  double V;                        // the vocabulary label smoothing spreads over
  std::vector<int64_t> target;     // class-index targets: see kIgnored, kElsewhere
  std::vector<double> row_weight;  // weight of the row's loss (0 when ignored)
  double total_weight = 0.0;       // the mean's divisors: of the cross-entropy,
  double counted = 0.0;            // and of the z-loss (the non-ignored rows)
  double weight_sum = 0.0;         // sum of the class weights of this input's classes
  double weight_sum_all = 0.0;     // ... of the whole vocabulary

  Rows(const Problem& prob, const LossOptions& o) : p(prob), opt(o), cfg{}, k(cpu::kernels()) {
    const int64_t elem = int64_t(element_size(prob.dtype));
    cfg.dtype = kernel_dtype(prob.dtype);
    cfg.num_classes = prob.classes;
    cfg.logit_scale = o.logit_scale;
    cfg.softcap = o.softcap;
    cfg.weight = prob.weight.has_value() ? prob.weight->const_data_ptr() : nullptr;
    cfg.prob_smoothing = prob.prob ? o.label_smoothing : 0.0;
    cfg.need_sum_z = !prob.prob && o.label_smoothing > 0;
    x = static_cast<const char*>(prob.logits.const_data_ptr());
    x_stride = prob.logits.stride(0) * elem;
    if (prob.prob) {
      y = static_cast<const char*>(prob.target.const_data_ptr());
      y_stride = prob.target.stride(0) * elem;
    }
    V = double(vocabulary(o, prob.classes));
    weight_sum = double(prob.classes);
    if (cfg.weight) {
      weight_sum = 0.0;
      for (int64_t c = 0; c < prob.classes; ++c) weight_sum += class_weight(c);
    }
    weight_sum_all = o.vocab_size >= 0 ? V : weight_sum;  // slices take no class weights
    read_targets();
  }

  double class_weight(int64_t c) const {
    if (!cfg.weight) return 1.0;
    return p.acc_type == ScalarType::Double ? static_cast<const double*>(cfg.weight)[c]
                                            : double(static_cast<const float*>(cfg.weight)[c]);
  }
  const void* x_row(int64_t r) const { return x + r * x_stride; }
  const void* y_row(int64_t r) const { return y ? y + r * y_stride : nullptr; }
  bool ignored(int64_t r) const { return !p.prob && target[r] == kIgnored; }
  bool target_here(int64_t r) const { return target[r] >= 0; }

  // Validates class indices (before any parallel region) and sums the weights.
  void read_targets() {
    row_weight.assign(p.rows, 1.0);
    if (p.prob) {
      total_weight = counted = double(p.rows);
      return;
    }
    target.resize(p.rows);
    const int64_t V_int = int64_t(V);
    auto read = [&](const auto* t) {
      for (int64_t r = 0; r < p.rows; ++r) {
        const int64_t cls = int64_t(t[r]);
        if (cls == opt.ignore_index) {
          target[r] = kIgnored;
          row_weight[r] = 0.0;
          continue;
        }
        FASTCE_CHECK_INDEX(cls >= 0 && cls < V_int, "Target ", cls, " is out of bounds.");
        const int64_t local = cls - opt.class_offset;
        target[r] = local >= 0 && local < p.classes ? local : kElsewhere;
        row_weight[r] = target[r] >= 0 ? class_weight(local) : 1.0;
        total_weight += row_weight[r];
        counted += 1.0;
      }
    };
    switch (p.target.scalar_type()) {
      case ScalarType::Long: read(p.target.const_data_ptr<int64_t>()); break;
      case ScalarType::Int: read(p.target.const_data_ptr<int32_t>()); break;
      default: read(p.target.const_data_ptr<uint8_t>()); break;
    }
  }

  Divisors divisors() const { return {total_weight, counted}; }
  int64_t pieces() const { return cpu::pieces_per_row(p.classes); }
  template <class F>
  void for_each_piece(F&& f) const { cpu::for_each_piece(p.rows, p.classes, f); }
};

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

RowLse lse_of(const cpu::PieceStats& st) { return row_lse(st.max, st.sumexp, st.has_nan); }

// sum_c m_c (shift - z_c) over row r in float64, logit by logit, with m_c = w_c (class-index
// targets) or w_c y'_c (probability targets, y' smoothed): for rows with a huge lse only
// (see weighted_lse_minus_z).
double row_gap(const Rows& rows, int64_t r, double shift) {
  const double eps = rows.opt.label_smoothing, C = double(rows.p.classes);
  double gap = 0.0;
  for (int64_t c = 0; c < rows.p.classes; ++c) {
    double m = rows.class_weight(c);
    if (rows.p.prob) m = (1.0 - eps) * rows.k.sum_wy(rows.cfg, rows.y_row(r), c, c + 1) + eps / C * m;
    gap += m * (shift - rows.k.transform_one(rows.cfg, rows.x_row(r), c));
  }
  return gap;
}

// Row r's loss from its statistics.
double row_loss(const Rows& rows, int64_t r, const cpu::PieceStats& st, const RowLse& l) {
  const double eps = rows.opt.label_smoothing;
  const bool needs_gap = l.shift != 0.0 && (rows.p.prob || eps > 0);
  const RowSums sums{st.sum_wz, st.sum_wyz, st.sum_wy, needs_gap ? row_gap(rows, r, l.shift) : 0.0};
  if (rows.p.prob) return prob_row_loss(l, sums);
  const bool here = rows.target_here(r);
  const double z_t = here ? rows.k.transform_one(rows.cfg, rows.x_row(r), rows.target[r]) : 0.0;
  return class_row_loss(l, here, rows.row_weight[r], z_t, eps, rows.V, rows.weight_sum, sums);
}

// The probability targets' sum of w_c * y_c of row r (0 for class-index targets).
double row_sum_wy(const Rows& rows, int64_t r) {
  return rows.p.prob ? rows.k.sum_wy(rows.cfg, rows.y_row(r), 0, rows.p.classes) : 0.0;
}

// Coefficients of the gradient of row r (not ignored) for its incoming gradients (row_grads).
GradCoef row_grad_coef(const Rows& rows, int64_t r, const RowGrads& g, const RowLse& l, double sum_wy) {
  const int64_t target = rows.p.prob ? -1 : std::max<int64_t>(rows.target[r], -1);
  return grad_coef(l, g, rows.p.prob, rows.row_weight[r], target, rows.opt.label_smoothing, rows.V,
                   rows.weight_sum_all, rows.opt.lse_square_scale, sum_wy);
}

// Where a gradient is written: gx (and gy for probability targets), rows `stride` bytes apart.
struct GradOut {
  char* gx = nullptr;
  char* gy = nullptr;
  int64_t gx_stride = 0, gy_stride = 0, elem = 0;
  GradOut(Tensor* gx2d, Tensor* gy2d) {
    elem = int64_t(gx2d->element_size());
    gx = static_cast<char*>(gx2d->mutable_data_ptr());
    gx_stride = gx2d->stride(0) * elem;
    if (gy2d) {
      gy = static_cast<char*>(gy2d->mutable_data_ptr());
      gy_stride = gy2d->stride(0) * elem;
    }
  }
  // Writes the gradient of x[begin, end) of row r; ignored rows get zeros.
  void write(const Rows& rows, int64_t r, int64_t begin, int64_t end, const GradCoef* coef) const {
    char* gx_row = gx + r * gx_stride;
    if (!coef) {
      std::memset(gx_row + begin * elem, 0, (end - begin) * elem);
      return;
    }
    rows.k.piece_grad(rows.cfg, rows.x_row(r), rows.y_row(r), gx_row, gy ? gy + r * gy_stride : nullptr,
                      begin, end, *coef);
  }
};

// The (reduced) loss and z-loss outputs from the per-row values.
std::pair<Tensor, Tensor> loss_outputs(const Rows& rows, const std::vector<double>& loss,
                                       const std::vector<double>& zloss, const Tensor& input, ScalarType dtype) {
  const Problem& p = rows.p;
  if (rows.opt.reduction == kNone)
    return {from_doubles(loss, p.row_shape, dtype, input), from_doubles(zloss, p.row_shape, dtype, input)};
  double sum = 0.0, zsum = 0.0;  // in row order: deterministic by construction
  for (size_t r = 0; r < loss.size(); ++r) {
    sum += loss[r];
    zsum += zloss[r];
  }
  const Reduced red = reduce_losses(sum, zsum, rows.divisors(), rows.opt.reduction);
  return {from_doubles({red.loss}, {}, dtype, input), from_doubles({red.z_loss}, {}, dtype, input)};
}

// The gradient for unit grad_loss and zero grad_z_loss, as the backward op computes it (from
// the forward's lse output).
BackwardArgs unit_gradient(const Problem& p, const LossOptions& opt, const Tensor& input, const Tensor& lse,
                           const Tensor& total_weight) {
  const int64_t n = opt.reduction == kNone ? p.rows : 1;
  return BackwardArgs{from_doubles(std::vector<double>(n, 1.0), {n}, ScalarType::Double, input),
                      from_doubles(std::vector<double>(n, 0.0), {n}, ScalarType::Double, input), lse,
                      total_weight, opt, opt.vocab_size >= 0 ? 3 : 1};
}

// A vocabulary slice's lse output: rules.h's SliceLse of each row, (*rows, 3); zeros for ignored rows.
Tensor slice_lse_output(const std::vector<SliceLse>& rows, const Problem& p, const Tensor& input) {
  std::vector<double> values;
  values.reserve(rows.size() * 3);
  for (const SliceLse& s : rows) values.insert(values.end(), {s.max, s.log_sum, s.lse_weight});
  std::vector<int64_t> shape = p.row_shape;
  shape.push_back(3);
  return from_doubles(values, shape, ScalarType::Double, input);
}

struct Cpu {
  struct Guard {
    explicit Guard(const Tensor&) {}
  };

  // (N, C, d1..dk) logits with this many positions or more are kept in their layout (lanes.h).
  static constexpr int64_t kSpatialMinInner = cpu::kSpatialMinInner;

  // (rows, classes); a spatial problem's in the input's shape (and contiguous layout).
  static Tensor new_grad_buffer(const Problem& p, const Tensor& input) {
    Tensor g = cpu::new_grad_buffer(p.rows, p.classes, p.dtype, input);
    return p.spatial ? torch::stable::reshape(g, input.sizes()) : g;
  }

  // compute_grad: also the gradient for grad_loss = 1 and grad_z_loss = 0. With enough rows
  // to balance the threads, a task is a whole row: its statistics, loss, then gradient while
  // the row is still in cache. Few long rows are split into pieces, and get their gradient
  // after the pieces' statistics are merged (by the backward pass).
  static ForwardResult forward(const Tensor& input, const Problem& p, const LossOptions& opt, bool compute_grad,
                               ScalarType loss_dtype) {
    if (cpu::takes_lanes(p, opt)) {  // spatial problems and rows of few classes (lanes.h)
      if (!compute_grad) return cpu::lanes_forward(input, p, opt, nullptr, loss_dtype);
      Tensor gx = new_grad_buffer(p, input);
      return cpu::lanes_forward(input, p, opt, &gx, loss_dtype);
    }
    const Rows rows(p, opt);
    const int64_t np = rows.pieces();
    std::vector<cpu::PieceStats> stats(p.rows * np);
    std::vector<double> loss(p.rows, 0.0), zloss(p.rows, 0.0), lse(p.rows, 0.0);  // 0: ignored rows
    const bool slice = opt.vocab_size >= 0;
    std::vector<SliceLse> slice_lse_rows(slice ? p.rows : 0, SliceLse{0.0, 0.0, 0.0});
    auto finish_row = [&](int64_t r) {
      cpu::PieceStats merged;
      if (np > 1) merged = merge_pieces(&stats[r * np], np);
      const cpu::PieceStats& st = np > 1 ? merged : stats[r * np];  // no copy: see piece_stats_t
      const RowLse l = lse_of(st);
      zloss[r] = z_loss(opt.lse_square_scale, full(l));
      loss[r] = row_loss(rows, r, st, l) + zloss[r];
      lse[r] = full(l);
      if (slice) {
        const double weight = class_row_lse_weight(rows.target_here(r), rows.row_weight[r], opt.label_smoothing,
                                                   rows.V, rows.weight_sum);
        slice_lse_rows[r] = slice_lse(st.max, st.sumexp, st.has_nan, weight);
      }
      return l;
    };

    ForwardResult out;
    out.total_weight = from_doubles({rows.total_weight, rows.counted}, {2}, p.acc_type, input);
    Tensor gx2d;
    if (compute_grad) gx2d = new_grad_buffer(p, input);
    const bool grad_in_pass =
        compute_grad && p.classes > 0 && (np == 1 || p.rows >= 4 * int64_t(torch::stable::get_num_threads()));
    if (grad_in_pass) {
      const GradOut gout(&gx2d, nullptr);
      const RowGrads g = row_grads(1.0, 0.0, divisors_of(out.total_weight), opt.reduction);  // as the backward op
      const int64_t grain = std::max<int64_t>(1, kMinChunk / std::max<int64_t>(1, p.classes));
      cpu::parallel_rows(p.rows, grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          if (rows.ignored(r)) {
            gout.write(rows, r, 0, p.classes, nullptr);
            continue;
          }
          row_piece_stats(rows, r, &stats[r * np]);
          const GradCoef k = row_grad_coef(rows, r, g, finish_row(r), row_sum_wy(rows, r));
          gout.write(rows, r, 0, p.classes, &k);
        }
      });
    } else {
      rows.for_each_piece([&](int64_t task, int64_t r, int64_t begin, int64_t end) {
        if (!rows.ignored(r)) rows.k.piece_stats(rows.cfg, rows.x_row(r), rows.y_row(r), begin, end, &stats[task]);
      });
      cpu::parallel_rows(p.rows, std::max<int64_t>(1, 4096 / np), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          if (!rows.ignored(r)) finish_row(r);
      });
    }

    std::tie(out.loss, out.z_loss) = loss_outputs(rows, loss, zloss, input, loss_dtype);
    out.lse = slice ? slice_lse_output(slice_lse_rows, p, input) : from_doubles(lse, p.row_shape, ScalarType::Double, input);
    if (!compute_grad) {
      out.grad_input = empty_on(input, {0}, p.dtype);
      return out;
    }
    if (!grad_in_pass)  // few rows of several pieces: their lse is known only now
      backward_rows(rows, unit_gradient(p, opt, input, out.lse, out.total_weight), gx2d, nullptr);
    out.grad_input = grad_to_input_layout(gx2d, input);
    return out;
  }

  static void backward_into(const BackwardArgs& b, const Problem& p, Tensor& gx2d, Tensor* gy2d) {
    if (cpu::takes_lanes(p, b.opt)) return cpu::lanes_backward(b, p, gx2d, gy2d);
    backward_rows(Rows(p, b.opt), b, gx2d, gy2d);
  }

  // Writes the gradient of the logits (and of probability targets) into gx2d / gy2d.
  static void backward_rows(const Rows& rows, const BackwardArgs& b, Tensor& gx2d, Tensor* gy2d) {
    const Problem& p = rows.p;
    const bool per_row = b.opt.reduction == kNone;
    const Divisors div = divisors_of(b.total_weight);
    const int64_t n_grad = per_row ? p.rows : 1;
    const std::vector<double> gl = to_doubles(b.grad_loss, n_grad, "grad_loss");
    const std::vector<double> gz = to_doubles(b.grad_z_loss, n_grad, "grad_z_loss");
    const int64_t k = b.lse_columns;
    const std::vector<double> lse_rows = to_doubles(b.lse, p.rows * k, "lse");
    // A row whose lse is huge (see RowLse) gets its max and log-sum again from the logits,
    // before any gradient is written (in place, over them); the others' lse is the saved one.
    // A vocabulary slice's lse is the whole vocabulary's, given as (shift, rel): exact already.
    std::vector<int64_t> huge_rows;
    for (int64_t r = 0; r < p.rows && b.opt.vocab_size < 0; ++r)
      if (!rows.ignored(r) && huge_lse(lse_rows[r])) huge_rows.push_back(r);
    std::vector<RowLse> recomputed(huge_rows.empty() ? 0 : p.rows);  // by row, for huge rows only
    cpu::parallel_rows(int64_t(huge_rows.size()), 1, [&](int64_t lo, int64_t hi) {
      std::vector<cpu::PieceStats> pieces(rows.pieces());
      for (int64_t i = lo; i < hi; ++i) {
        row_piece_stats(rows, huge_rows[i], pieces.data());
        recomputed[huge_rows[i]] = lse_of(merge_pieces(pieces.data(), rows.pieces()));
      }
    });
    auto lse_of_row = [&](int64_t r) {
      if (b.opt.vocab_size >= 0) return split_lse(lse_rows[r * k], lse_rows[r * k + 1]);
      return recomputed.empty() || !huge_lse(lse_rows[r]) ? RowLse{0.0, lse_rows[r]} : recomputed[r];
    };

    std::vector<double> sum_wy;
    if (p.prob) {
      sum_wy.resize(p.rows);
      cpu::parallel_rows(p.rows, std::max<int64_t>(1, kMinChunk / std::max<int64_t>(1, p.classes)),
                         [&](int64_t lo, int64_t hi) {
                           for (int64_t r = lo; r < hi; ++r) sum_wy[r] = row_sum_wy(rows, r);
                         });
    }

    const GradOut out(&gx2d, gy2d);
    rows.for_each_piece([&](int64_t, int64_t r, int64_t begin, int64_t end) {
      if (rows.ignored(r)) return out.write(rows, r, begin, end, nullptr);
      const int64_t i = per_row ? r : 0;
      const GradCoef k = row_grad_coef(rows, r, row_grads(gl[i], gz[i], div, b.opt.reduction), lse_of_row(r),
                                       p.prob ? sum_wy[r] : 0.0);
      out.write(rows, r, begin, end, &k);
    });
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastce, CPU, m) {
  m.impl("cross_entropy_forward", &forward_kernel<Cpu>);
  m.impl("cross_entropy_backward", &backward_kernel<Cpu>);
  m.impl("cross_entropy_backward_inplace", &backward_inplace_kernel<Cpu>);
}

}  // namespace fastce
