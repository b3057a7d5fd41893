// Vocabulary-parallel cross-entropy: the passes over one rank's shard of the logits.
//
// Each rank of a tensor-parallel group holds a contiguous slice [shard_start,
// shard_start + shard_classes) of the vocabulary. python/fastce/parallel.py runs
// vocab_parallel_stats on the shard, exchanges O(rows) numbers between the ranks, and
// finishes with vocab_parallel_loss, whose gradient (vocab_parallel_backward) needs no
// communication: with the global log-sum-exp L, the shard's gradient in z-space is
//   g * ((1 + 2 s L) * exp(z_c - L) - eps / C) - g * (1 - eps) * [c is the target]
// (s: lse_square_scale, eps: label_smoothing, C: the global vocabulary size), which is
// the CPU row kernels' GradCoef with target = -1 on rows whose target lies elsewhere.
//
// Kernels: the CPU row kernels (cpu/row_kernels.h) on CPU, and a device-generic
// version in ATen ops (CompositeExplicitAutograd) for every other device.
// Fake kernels and autograd: python/fastce/parallel.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/driver.h"
#include "cross_entropy.h"

namespace fastce {
namespace {

// Validates like cross_entropy does, and rejects probability targets.
Problem prepare_shard(const at::Tensor& logits, const at::Tensor& target, const Options& opt) {
  Problem p = prepare(logits, target, std::nullopt, opt);
  TORCH_CHECK(!p.prob, "vocab_parallel_cross_entropy takes class indices as target, not probabilities");
  p.target = p.target.to(at::kLong);
  return p;
}

Options shard_options(int64_t ignore_index, double label_smoothing, double logit_scale,
                      std::optional<double> softcap, double lse_square_scale) {
  return make_options(kNone, ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale);
}

at::Tensor rows_like(const Problem& p, const at::Tensor& flat) {
  return flat.view(p.row_shape);
}

// z = logit_scale * x, then soft-capped, in the accumulation dtype; also dz/dx when asked.
at::Tensor transform(const at::Tensor& x, const Options& opt, at::Tensor* slope = nullptr) {
  if (opt.softcap > 0) {
    const at::Tensor t = at::tanh(x * (opt.logit_scale / opt.softcap));
    if (slope) *slope = (1 - t * t) * opt.logit_scale;
    return t * opt.softcap;
  }
  if (slope) *slope = at::scalar_tensor(opt.logit_scale, x.options());
  return x * opt.logit_scale;
}

// ---- CPU: the SIMD row kernels --------------------------------------------------

cpu::RowConfig row_config(const Problem& p, const Options& opt) {
  cpu::RowConfig cfg{};
  cfg.dtype = cpu::kernel_dtype(p.logits.scalar_type());
  cfg.num_classes = p.classes;
  cfg.logit_scale = opt.logit_scale;
  cfg.softcap = opt.softcap;
  cfg.weight = nullptr;
  cfg.need_sum_z = true;  // the smoothing sum is exchanged between the ranks
  return cfg;
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& logits, const at::Tensor& target,
                                             int64_t ignore_index, double logit_scale,
                                             std::optional<double> softcap) {
  const Options opt = shard_options(ignore_index, 0.0, logit_scale, softcap, 0.0);
  const Problem p = prepare_shard(logits, target, opt);
  const cpu::RowConfig cfg = row_config(p, opt);
  const cpu::RowKernels& k = cpu::kernels();
  const int64_t np = cpu::pieces_per_row(p.classes);
  const int64_t* t = p.target.data_ptr<int64_t>();
  const char* x = static_cast<const char*>(p.logits.data_ptr());
  const int64_t x_stride = p.logits.stride(0) * p.logits.element_size();

  std::vector<cpu::PieceStats> pieces(p.rows * np);
  cpu::for_each_piece(p.rows, p.classes, [&](int64_t task, int64_t r, int64_t begin, int64_t end) {
    if (t[r] != ignore_index) k.piece_stats(cfg, x + r * x_stride, nullptr, begin, end, &pieces[task]);
  });
  at::Tensor lse = at::zeros({p.rows}, at::kDouble), sum_z = at::zeros({p.rows}, at::kDouble);
  double* lse_p = lse.data_ptr<double>();
  double* sum_p = sum_z.data_ptr<double>();
  for (int64_t r = 0; r < p.rows; ++r) {
    if (t[r] == ignore_index) continue;  // zeros: finite, so the exchange stays NaN-free
    cpu::PieceStats st = pieces[r * np];
    for (int64_t j = 1; j < np; ++j) cpu::merge_stats(st, pieces[r * np + j]);
    // An empty or all -inf shard has lse -inf: it adds nothing to the other shards.
    lse_p[r] = st.has_nan ? NAN : st.max + std::log(st.sumexp);
    sum_p[r] = st.sum_wz;
  }
  return {rows_like(p, lse.to(p.acc_type)), rows_like(p, sum_z.to(p.acc_type))};
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& shard_start, const at::Tensor& num_classes,
                        const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
                        double logit_scale, std::optional<double> softcap, double lse_square_scale) {
  const Options opt = shard_options(ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale);
  const Problem p = prepare_shard(logits, target, opt);
  const cpu::RowConfig cfg = row_config(p, opt);
  const cpu::RowKernels& k = cpu::kernels();
  const int64_t start = shard_start.item<int64_t>();
  const double eps = label_smoothing, C = num_classes.item<double>(), s = lse_square_scale;
  const at::Tensor g_d = grad.to(at::kDouble).contiguous().reshape({-1});
  const at::Tensor lse_d = lse.to(at::kDouble).contiguous().reshape({-1});
  const double* gp = g_d.data_ptr<double>();
  const double* lp = lse_d.data_ptr<double>();
  const int64_t* t = p.target.data_ptr<int64_t>();
  const char* x = static_cast<const char*>(p.logits.data_ptr());
  const int64_t x_stride = p.logits.stride(0) * p.logits.element_size();

  at::Tensor gx2d = at::empty({p.rows, p.classes}, logits.options());
  const int64_t elem = gx2d.element_size();
  char* gx = static_cast<char*>(gx2d.data_ptr());
  cpu::for_each_piece(p.rows, p.classes, [&](int64_t, int64_t r, int64_t begin, int64_t end) {
    char* gx_row = gx + r * p.classes * elem;
    if (t[r] == ignore_index) {
      std::memset(gx_row + begin * elem, 0, (end - begin) * elem);
      return;
    }
    const int64_t local = t[r] - start;
    cpu::GradCoef c{};
    c.lse = lp[r];
    c.coef_p = gp[r] * (1.0 + 2.0 * s * lp[r]);
    c.coef_w = gp[r] * eps / C;
    c.target = local >= 0 && local < p.classes ? local : -1;
    c.coef_target = gp[r] * (1.0 - eps);
    k.piece_grad(cfg, x + r * x_stride, nullptr, gx_row, nullptr, begin, end, c);
  });
  return grad_to_input_layout(gx2d, logits);
}

// ---- every other device: ATen ops ------------------------------------------------

std::tuple<at::Tensor, at::Tensor> stats_generic(const at::Tensor& logits, const at::Tensor& target,
                                                 int64_t ignore_index, double logit_scale,
                                                 std::optional<double> softcap) {
  const Options opt = shard_options(ignore_index, 0.0, logit_scale, softcap, 0.0);
  const Problem p = prepare_shard(logits, target, opt);
  const at::Tensor z = transform(p.logits.to(p.acc_type), opt);
  const at::Tensor ignored = p.target == ignore_index;
  const at::Tensor lse = at::logsumexp(z, {1}).masked_fill(ignored, 0);
  const at::Tensor sum_z = z.sum(1).masked_fill(ignored, 0);
  return {rows_like(p, lse), rows_like(p, sum_z)};
}

at::Tensor backward_generic(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& shard_start, const at::Tensor& num_classes,
                            const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
                            double logit_scale, std::optional<double> softcap, double lse_square_scale) {
  const Options opt = shard_options(ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale);
  const Problem p = prepare_shard(logits, target, opt);
  at::Tensor slope;
  const at::Tensor z = transform(p.logits.to(p.acc_type), opt, &slope);
  const at::Tensor L = lse.reshape({-1, 1}).to(p.acc_type);
  const at::Tensor ignored = (p.target == ignore_index).unsqueeze(1);
  const at::Tensor g = grad.reshape({-1, 1}).to(p.acc_type).masked_fill(ignored, 0);
  const double eps = label_smoothing, s = lse_square_scale;
  at::Tensor dz = at::exp(z - L) * (g * (1 + 2 * s * L)) - g * eps / num_classes.to(p.acc_type);
  if (p.classes > 0) {
    const at::Tensor local = p.target.unsqueeze(1) - shard_start;
    const at::Tensor inside = (local >= 0) & (local < p.classes);
    dz.scatter_add_(1, local.clamp(0, p.classes - 1), at::where(inside, -g * (1 - eps), 0));
  }
  const at::Tensor gx2d = (dz * slope).masked_fill(ignored, 0).to(logits.scalar_type());
  return grad_to_input_layout(gx2d.contiguous(), logits);
}

// The per-row loss from the statistics of the whole vocabulary; the logits only
// carry the gradient (see vocab_parallel_backward).
at::Tensor loss_generic(const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& /*shard_start*/, const at::Tensor& num_classes, const at::Tensor& lse, const at::Tensor& target_logit,
                        const at::Tensor& sum_z, int64_t ignore_index, double label_smoothing,
                        double logit_scale, std::optional<double> softcap, double lse_square_scale) {
  const Options opt = shard_options(ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale);
  const Problem p = prepare_shard(logits, target, opt);
  const at::Tensor valid = p.target != ignore_index;
  const at::Tensor bad = valid & ((p.target < 0) | (p.target >= num_classes));
  if (p.target.is_cpu()) {
    const at::Tensor first = bad.nonzero();
    TORCH_CHECK_INDEX(first.numel() == 0, "Target ", p.target[first[0][0]].item<int64_t>(),
                      " is out of bounds.");
  } else {
    at::_assert_async(bad.any().logical_not(), "vocab_parallel_cross_entropy: target is out of bounds");
  }
  const double eps = label_smoothing, s = lse_square_scale;
  const at::Tensor L = lse.reshape({-1}), z_t = target_logit.reshape({-1});
  at::Tensor loss = (1 - eps) * (L - z_t) + s * L * L;
  if (eps > 0) loss = loss + eps * L - eps * sum_z.reshape({-1}) / num_classes.to(L.scalar_type());
  return rows_like(p, loss.masked_fill(valid.logical_not(), 0));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastce, m) {
  // This shard's per-row log-sum-exp and sum of the transformed logits z (zeros on
  // ignored rows), shaped like the loss with reduction='none', in the accumulation
  // dtype (float32; float64 for float64 logits). Not differentiable.
  m.def(
      "vocab_parallel_stats(Tensor logits, Tensor target, int ignore_index, float logit_scale, "
      "float? softcap) -> (Tensor lse, Tensor sum_z)");
  // The per-row loss (reduction='none', accumulation dtype) from the whole vocabulary's
  // lse, target logit z_t and sum of z. target: global class indices; shard_start and
  // num_classes: 0-d int64 tensors. Differentiable in logits only.
  m.def(
      "vocab_parallel_loss(Tensor logits, Tensor target, Tensor shard_start, Tensor num_classes, "
      "Tensor lse, Tensor target_logit, Tensor sum_z, int ignore_index, float label_smoothing, "
      "float logit_scale, float? softcap, float lse_square_scale) -> Tensor");
  // The gradient of this shard's logits, given that of the per-row loss.
  m.def(
      "vocab_parallel_backward(Tensor grad, Tensor logits, Tensor target, Tensor shard_start, "
      "Tensor num_classes, Tensor lse, int ignore_index, float label_smoothing, float logit_scale, "
      "float? softcap, float lse_square_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastce, CPU, m) {
  m.impl("vocab_parallel_stats", &stats_cpu);
  m.impl("vocab_parallel_backward", &backward_cpu);
}

TORCH_LIBRARY_IMPL(fastce, CompositeExplicitAutograd, m) {
  m.impl("vocab_parallel_stats", &stats_generic);
  m.impl("vocab_parallel_loss", &loss_generic);
  m.impl("vocab_parallel_backward", &backward_generic);
}

}  // namespace fastce
