// C entry points over the emulated kernels (forward.cu / backward.cu, rewritten by
// test_emulation.py): what the CUDA driver (csrc/cuda/cross_entropy_cuda.cpp) passes them, with
// plan_chunk given an SM count.
#include <atomic>
#include <cstdio>
#include <vector>
std::atomic<int> emu_asserts{0};
void emu_assert_fail(const char* what) { if (emu_asserts++ == 0) std::fprintf(stderr, "device assert: %s\n", what); }
#include "forward_emu.inc"
#include "backward_emu.inc"

using namespace fastce;
using namespace fastce::cuda;

// A (rows, classes) problem as the driver's View holds it (test_emulation.py: Problem).
struct EmuProblem {
  int dtype;
  const void* x;
  int64_t x_stride;
  const void* y;
  int64_t y_stride;
  const int64_t* target;
  const void* weight;
  int64_t rows, classes;
};

static Rows make_rows(const EmuProblem& p, const LossOptions& opt, int sm, double* weight_sum) {
  Rows v{};
  v.dtype = Dtype(p.dtype);
  v.x = p.x; v.x_stride = p.x_stride; v.y = p.y; v.y_stride = p.y_stride; v.target = p.target; v.weight = p.weight;
  v.rows = p.rows; v.classes = p.classes; v.opt = opt;
  if (p.weight && opt.label_smoothing > 0) {
    launch_weight_sum(v.dtype, p.weight, p.classes, weight_sum, nullptr);
    v.weight_sum = weight_sum;
  }
  v.chunk = plan_chunk(p.rows, p.classes, v.dtype, sm);
  v.chunks = p.classes > v.chunk ? (p.classes + v.chunk - 1) / v.chunk : 1;
  return v;
}

// Returns the pieces per row, or -1 when a device assert failed.
extern "C" int64_t emu_forward(const EmuProblem* p, const LossOptions* opt, int sm, int loss_dtype, double* lse,
                               double* row_loss, double* row_zloss, double* row_weight, void* loss, void* zloss,
                               void* total_weight) {
  emu_asserts = 0;
  double ws = 0;
  ForwardArgs a{};
  a.v = make_rows(*p, *opt, sm, &ws);
  a.lse = lse; a.row_loss = row_loss; a.row_zloss = row_zloss; a.row_weight = row_weight;
  std::vector<double> partial(p->rows * a.v.chunks * kPartialValues + 1);
  a.partial = partial.data();
  a.loss_dtype = Dtype(loss_dtype); a.loss_out = loss; a.zloss_out = zloss; a.total_weight = total_weight;
  launch_forward(a, nullptr);
  return emu_asserts.load() ? -1 : a.v.chunks;
}

// grad_loss / grad_zloss null: the unit gradient (the forward's compute_grad).
extern "C" int64_t emu_backward(const EmuProblem* p, const LossOptions* opt, int sm, const void* grad_loss,
                                const void* grad_zloss, int grad_dtype, const void* total_weight, int tw_dtype,
                                const double* lse, void* gx, int64_t gx_stride, void* gy, int64_t gy_stride) {
  emu_asserts = 0;
  double ws = 0;
  BackwardArgs a{};
  a.v = make_rows(*p, *opt, sm, &ws);
  a.grad_loss = {grad_loss, Dtype(grad_dtype)};
  a.grad_zloss = {grad_zloss, Dtype(grad_dtype)};
  a.total_weight = {total_weight, Dtype(tw_dtype)};
  a.lse = lse;
  std::vector<double> sum_wy(p->rows + 1);
  std::vector<RowLse> huge(p->rows + 1);
  a.sum_wy = sum_wy.data();
  a.huge_lse = opt->vocab_size < 0 ? huge.data() : nullptr;  // as the driver
  a.gx = gx; a.gx_stride = gx_stride; a.gy = gy; a.gy_stride = gy_stride;
  launch_backward(a, nullptr);
  return emu_asserts.load() ? -1 : a.v.chunks;
}
