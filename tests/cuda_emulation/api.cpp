// C entry points over the emulated kernels (forward.cu / backward.cu, rewritten by
// test_emulation.py): what the CUDA driver passes them, with plan_chunk given an SM count.
#include <atomic>
#include <cstdio>
#include <cstdlib>
std::atomic<int> emu_asserts{0};
void emu_assert_fail(const char* what) { if (emu_asserts++ == 0) std::fprintf(stderr, "device assert: %s\n", what); }
#include "forward_emu.inc"
#include "backward_emu.inc"

using namespace fastce::cuda;
static Rows make_rows(int dtype, const void* x, int64_t xs, const void* y, int64_t ys, const int64_t* t,
                      const void* w, int64_t rows, int64_t classes, int64_t ignore, double eps, double scale,
                      double cap, double sq, int sm, double* ws) {
  Rows v{};
  v.dtype = Dtype(dtype); v.x = x; v.x_stride = xs; v.y = y; v.y_stride = ys; v.target = t; v.weight = w;
  v.rows = rows; v.classes = classes; v.ignore_index = ignore; v.label_smoothing = eps;
  v.logit_scale = scale; v.softcap = cap; v.lse_square_scale = sq;
  if (w && eps > 0) { launch_weight_sum(v.dtype, w, classes, ws, nullptr); v.weight_sum = ws; }
  v.chunk = plan_chunk(rows, classes, v.dtype, sm);
  v.chunks = classes > v.chunk ? (classes + v.chunk - 1) / v.chunk : 1;
  return v;
}
extern "C" int64_t emu_forward(int dtype, const void* x, int64_t xs, const void* y, int64_t ys, const int64_t* t,
    const void* w, int64_t rows, int64_t classes, int64_t ignore, double eps, double scale, double cap, double sq,
    int sm, int64_t reduction, void* lse, void* row_loss, void* row_zloss, void* row_w, void* loss, void* zloss,
    void* tw) {
  emu_asserts = 0;
  double ws = 0;
  ForwardArgs a{};
  a.v = make_rows(dtype, x, xs, y, ys, t, w, rows, classes, ignore, eps, scale, cap, sq, sm, &ws);
  a.reduction = reduction; a.lse = lse; a.row_loss = row_loss; a.row_zloss = row_zloss; a.row_weight = row_w;
  std::vector<double> partial(rows * a.v.chunks * 5 + 1);
  a.partial = partial.data(); a.loss_out = loss; a.zloss_out = zloss; a.total_weight = tw;
  launch_forward(a, nullptr);
  return emu_asserts.load() ? -1 : a.v.chunks;
}
extern "C" int64_t emu_backward(int dtype, const void* x, int64_t xs, const void* y, int64_t ys, const int64_t* t,
    const void* w, int64_t rows, int64_t classes, int64_t ignore, double eps, double scale, double cap, double sq,
    int sm, int64_t reduction, const void* gl, const void* gz, const void* lse, const void* tw, void* gx,
    int64_t gxs, void* gy, int64_t gys) {
  emu_asserts = 0;
  double ws = 0;
  BackwardArgs a{};
  a.v = make_rows(dtype, x, xs, y, ys, t, w, rows, classes, ignore, eps, scale, cap, sq, sm, &ws);
  std::vector<double> s1(rows + 1), s2(rows * a.v.chunks + 1), s3(rows + 1), s4(2 * rows + 1);
  a.reduction = reduction; a.grad_loss = gl; a.grad_zloss = gz; a.lse = lse; a.total_weight = tw;
  a.sum_wy = s1.data(); a.others = s2.data(); a.x_target = s3.data(); a.lse_parts = s4.data();
  a.gx = gx; a.gx_stride = gxs; a.gy = gy; a.gy_stride = gys;
  launch_backward(a, nullptr);
  return emu_asserts.load() ? -1 : a.v.chunks;
}
