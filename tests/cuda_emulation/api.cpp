// C entry points over the emulated kernels (forward.cu / backward.cu, rewritten by
// test_emulation.py): what the CUDA driver (csrc/cuda/cross_entropy_cuda.cpp) passes them, with
// plan_chunk given an SM count. Every buffer a kernel writes is watched: its storage is
// snapshotted before the call, and after every launch each byte outside what the kernels may
// write (padding columns, guard regions after the buffer, other rows' strides) must be unchanged.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
std::atomic<int> emu_asserts{0}, emu_faults{0};
void emu_assert_fail(const char* what) { if (emu_asserts++ == 0) std::fprintf(stderr, "device assert: %s\n", what); }
void emu_fault(const char* what, const char* file, int line) {
  if (emu_faults++ == 0) std::fprintf(stderr, "emulation fault: %s at %s:%d\n", what, file, line);
}

// A watched storage: its bytes before the call, and which of them the kernels may write.
struct Watch {
  const unsigned char* base;
  std::vector<unsigned char> before;
  std::vector<unsigned char> writable;  // 1: a kernel may write this byte
};
static std::vector<Watch> emu_watches;

void emu_after_launch(const char* kernel) {
  for (const Watch& w : emu_watches)
    for (size_t i = 0; i < w.before.size(); ++i)
      if (!w.writable[i] && w.base[i] != w.before[i]) {
        emu_fault("a write outside the buffer (guard or padding byte changed)", kernel, int(i));
        break;
      }
}

// Watches n bytes at base; writable: n flags (nullptr: none writable).
extern "C" void emu_watch(const void* base, int64_t n, const unsigned char* writable) {
  const auto* b = static_cast<const unsigned char*>(base);
  Watch w{b, std::vector<unsigned char>(b, b + n), std::vector<unsigned char>(size_t(n), 0)};
  if (writable != nullptr) std::memcpy(w.writable.data(), writable, size_t(n));
  emu_watches.push_back(std::move(w));
}
extern "C" void emu_unwatch() { emu_watches.clear(); }
// Faults (misaligned vector accesses, changed guard bytes) since the last call; resets.
extern "C" int emu_take_faults() { return emu_faults.exchange(0); }

// Scratch the driver allocates, here with a NaN-filled guard region after it, watched.
template <class T>
struct Guarded {
  static constexpr size_t kGuard = 64;  // bytes
  std::vector<double> storage;          // 8-byte elements: as aligned as the allocator's
  T* data;
  explicit Guarded(size_t n) : storage((n * sizeof(T) + kGuard) / sizeof(double) + 1, NAN) {
    data = reinterpret_cast<T*>(storage.data());
    std::vector<unsigned char> writable(storage.size() * sizeof(double), 0);
    std::memset(writable.data(), 1, n * sizeof(T));
    emu_watch(storage.data(), int64_t(writable.size()), writable.data());
  }
};

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

// Returns the pieces per row, or -1 when a device assert failed. row_loss / row_zloss: as the
// driver passes them ('mean'/'sum' only); loss / zloss: 0-d, or (rows,) for 'none'.
extern "C" int64_t emu_forward(const EmuProblem* p, const LossOptions* opt, int sm, int loss_dtype, double* lse,
                               double* row_loss, double* row_zloss, double* row_weight, void* loss, void* zloss,
                               void* total_weight) {
  emu_asserts = 0;
  Guarded<double> ws(1);
  ForwardArgs a{};
  a.v = make_rows(*p, *opt, sm, ws.data);
  const bool reduced = opt->reduction != kNone;
  a.lse = lse; a.row_weight = row_weight;
  a.row_loss = reduced ? row_loss : nullptr;
  a.row_zloss = reduced ? row_zloss : nullptr;
  Guarded<double> partial(size_t(p->rows * a.v.chunks * kPartialValues));
  a.partial = a.v.chunks > 1 ? partial.data : nullptr;
  const int64_t parts = reduce_parts(p->rows);
  Guarded<double> reduce_partial(size_t(kReduceSums * parts));
  a.reduce_partial = parts > 1 ? reduce_partial.data : nullptr;
  a.loss_dtype = Dtype(loss_dtype); a.loss_out = loss; a.zloss_out = zloss; a.total_weight = total_weight;
  launch_forward(a, nullptr);
  return emu_asserts.load() ? -1 : a.v.chunks;
}

// grad_loss / grad_zloss null: the unit gradient (the forward's compute_grad).
extern "C" int64_t emu_backward(const EmuProblem* p, const LossOptions* opt, int sm, const void* grad_loss,
                                const void* grad_zloss, int grad_dtype, const void* total_weight, int tw_dtype,
                                const double* lse, void* gx, int64_t gx_stride, void* gy, int64_t gy_stride) {
  emu_asserts = 0;
  Guarded<double> ws(1);
  BackwardArgs a{};
  a.v = make_rows(*p, *opt, sm, ws.data);
  a.grad_loss = {grad_loss, Dtype(grad_dtype)};
  a.grad_zloss = {grad_zloss, Dtype(grad_dtype)};
  a.total_weight = {total_weight, Dtype(tw_dtype)};
  a.lse = lse;
  const bool split = a.v.chunks > 1;  // as the driver: split rows' scratch only
  Guarded<double> sum_wy(size_t(p->rows));
  Guarded<RowLse> huge(size_t(p->rows));
  a.sum_wy = split && p->y ? sum_wy.data : nullptr;
  a.huge_lse = split && opt->vocab_size < 0 ? huge.data : nullptr;
  a.gx = gx; a.gx_stride = gx_stride; a.gy = gy; a.gy_stride = gy_stride;
  launch_backward(a, nullptr);
  return emu_asserts.load() ? -1 : a.v.chunks;
}
