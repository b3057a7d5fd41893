"""The CUDA kernels (csrc/cuda/forward.cu, backward.cu) run on the CPU under a host emulation
of the CUDA execution model (shim.h: a thread per CUDA thread, barriers for warp shuffles),
against the float64 reference and against the CPU backend: every dtype and option, vocabulary
slices, loss_dtype, split rows, misaligned rows, in-place backward, determinism, the
target-gradient accuracy on confident rows, and the device assert.
Stricter than x86 where a GPU is: every vector access must be aligned to its width, inputs sit
in NaN-filled wider buffers (a read of a padding column poisons the result), and every buffer a
kernel may write is watched (its padding columns, guard regions after it, and the inputs must
be unchanged after each launch; shim.h, api.cpp).
For machines without a GPU; opt-in (a few minutes on 2 cores): FASTCE_CUDA_EMULATION=1.
Needs g++ with C++20 and the CUDA headers (CUDA_HOME)."""
import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from fastce._ops import LossOptions
from reference import reference_cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "..", "csrc", "cuda")
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

pytestmark = pytest.mark.skipif(
    os.environ.get("FASTCE_CUDA_EMULATION") != "1" or shutil.which("g++") is None
    or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
    reason="opt-in (FASTCE_CUDA_EMULATION=1), needs g++ and the CUDA headers (CUDA_HOME)")

DT = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # rules.h: Dtype
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 3e-3}
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}
REDUCE_ROWS_PER_BLOCK = 256  # launch.h: kReduceRowsPerBlock, lowered for the emulation
i64, dbl, ptr_t = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class Problem(ctypes.Structure):  # api.cpp: EmuProblem
    _fields_ = [("dtype", ctypes.c_int), ("x", ptr_t), ("x_stride", i64), ("y", ptr_t), ("y_stride", i64),
                ("target", ptr_t), ("weight", ptr_t), ("rows", i64), ("classes", i64)]


class Options(ctypes.Structure):  # rules.h: LossOptions (softcap 0: off)
    _fields_ = [("reduction", i64), ("ignore_index", i64), ("label_smoothing", dbl), ("logit_scale", dbl),
                ("softcap", dbl), ("lse_square_scale", dbl), ("class_offset", i64), ("vocab_size", i64)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """Builds the kernels' sources, launches rewritten for the emulator, into a shared library."""
    out = tmp_path_factory.mktemp("cuda_emulation")
    common = open(os.path.join(CSRC, "common.cuh")).read()
    common = common.replace('#include "launch.h"', f'#include "{os.path.join(CSRC, "launch.h")}"')
    (out / "common_emu.cuh").write_text('#include "shim.h"\n' + common)
    for name in ("forward", "backward"):
        src = open(os.path.join(CSRC, name + ".cu")).read().replace('"common.cuh"', '"common_emu.cuh"')
        src = re.sub(r"(\w+(?:<[^;<>]*>)?)<<<([^>]*)>>>\(([^;]*)\);", r'emu_launch("\1", \1, \2, \3);', src)
        assert "<<<" not in src, f"a launch in {name}.cu the emulator cannot rewrite"
        (out / f"{name}_emu.inc").write_text(src)
    so = out / "libemu.so"
    # Two-stage reductions from 256 rows on (4096 on a GPU), so that a test of a few
    # thousand emulated threads reaches them.
    subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread",
                    f"-DFASTCE_REDUCE_ROWS_PER_BLOCK={REDUCE_ROWS_PER_BLOCK}", f"-I{HERE}", f"-I{out}",
                    f"-I{CUDA_INCLUDE}", os.path.join(HERE, "api.cpp"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.emu_forward.restype = lib.emu_backward.restype = i64
    lib.emu_forward.argtypes = [ptr_t, ptr_t, ctypes.c_int, ctypes.c_int] + [ptr_t] * 7
    lib.emu_backward.argtypes = [ptr_t, ptr_t, ctypes.c_int, ptr_t, ptr_t, ctypes.c_int, ptr_t, ctypes.c_int,
                                 ptr_t, ptr_t, i64, ptr_t, i64]
    lib.emu_watch.argtypes = [ptr_t, i64, ptr_t]
    lib.emu_take_faults.restype = ctypes.c_int
    return lib


def ptr(t):
    return None if t is None else t.data_ptr()


def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


GUARD = 64  # NaN elements after every buffer


def nan_padded(t, left=0, right=0):
    """t (2-D) copied into a NaN-filled wider buffer: `left` NaN columns before each row, `right`
    after, and a guard region after the last row (x = buf[:, left:left + C] of a padded buffer)."""
    n, c = t.shape
    pitch = left + c + right
    buf = torch.full((n * pitch + GUARD,), float("nan"), dtype=t.dtype)
    view = buf.as_strided((n, c), (pitch, 1), left)
    view.copy_(t)
    return view


def nan_empty(shape, dtype):
    """A contiguous buffer of NaN with a guard region after it."""
    numel = 1
    for s in shape:
        numel *= s
    return torch.full((numel + GUARD,), float("nan"), dtype=dtype).as_strided(shape, torch.empty(shape).stride(), 0)


def grad_buffer(x, layout):
    """The gradient's buffer, NaN-filled, with guards: 'contiguous' (the driver's), or 'pitch':
    x's own row pitch and offset (every row aligned as x's)."""
    if layout == "contiguous":
        return nan_empty(tuple(x.shape), x.dtype)
    n, c = x.shape
    size = x.storage_offset() + (n - 1) * x.stride(0) + c + GUARD
    return torch.full((size,), float("nan"), dtype=x.dtype).as_strided(x.shape, x.stride(), x.storage_offset())


class Watched:
    """Watches the storages of the given tensors during one emulated call: afterwards nothing
    outside the `writable` tensors' elements has changed (checked after every launch), and no
    vector access was misaligned."""

    def __init__(self, lib, readonly, writable):
        self.lib, self.masks = lib, {}
        for t, w in [(t, False) for t in readonly if t is not None] + [(t, True) for t in writable if t is not None]:
            st = t.untyped_storage()
            mask = self.masks.setdefault(st.data_ptr(), torch.zeros(st.nbytes(), dtype=torch.uint8))
            if w and t.numel() > 0:
                es = t.element_size()
                el = torch.zeros(st.nbytes() // es, dtype=torch.uint8)
                el.as_strided(t.shape, t.stride(), t.storage_offset()).fill_(1)
                mask[:el.numel() * es] |= el.repeat_interleave(es)

    def __enter__(self):
        for base, mask in self.masks.items():
            self.lib.emu_watch(base, mask.numel(), mask.data_ptr())
        return self

    def __exit__(self, *exc):
        self.lib.emu_unwatch()
        faults = self.lib.emu_take_faults()
        assert exc[0] is not None or faults == 0, f"{faults} emulation faults (misaligned vectors, writes outside)"


class Kernels:
    """The emulated kernels on one (rows, classes) problem, called as the CUDA driver calls them."""

    def __init__(self, lib, x, t, w=None, sm=132, **options):
        self.lib, self.x, self.sm = lib, x, sm
        self.prob = t.shape == x.shape
        self.y = t if self.prob else None
        self.t = t if self.prob else t.long().contiguous()
        self.w = None if w is None else w.to(acc_dtype(x)).contiguous()
        self.opt = LossOptions(**options)
        self.options = Options(*[0.0 if v is None else v for v in self.opt])
        self.problem = Problem(DT[x.dtype], ptr(x), x.stride(0), ptr(t) if self.prob else None,
                               t.stride(0) if self.prob else 0, None if self.prob else ptr(self.t), ptr(self.w),
                               *x.shape)

    def inputs(self):
        return [self.x, self.t, self.w]

    def forward(self, loss_dtype=None):
        """(pieces per row or -1 after a device assert, loss, z_loss, lse, total_weight)."""
        rows = self.x.shape[0]
        loss_dtype = loss_dtype or self.x.dtype
        reduced = self.opt.reduction != 0
        slice_ = self.opt.vocab_size >= 0  # lse: (max, log-sum, weight of the lse) per row (rules.h: SliceLse)
        lse, row_weight = nan_empty((rows, 3) if slice_ else (rows,), torch.float64), nan_empty((rows,), torch.float64)
        row_loss, row_zloss = ((nan_empty((rows,), torch.float64) for _ in range(2)) if reduced else (None, None))
        shape = () if reduced else (rows,)
        loss, zloss = nan_empty(shape, loss_dtype), nan_empty(shape, loss_dtype)
        tw = nan_empty((2,), acc_dtype(self.x))  # the mean's divisors
        with Watched(self.lib, self.inputs(), [lse, row_weight, row_loss, row_zloss, loss, zloss, tw]):
            chunks = self.lib.emu_forward(ctypes.byref(self.problem), ctypes.byref(self.options), self.sm,
                                          DT[loss_dtype], *map(ptr, (lse, row_loss, row_zloss, row_weight, loss, zloss,
                                                                     tw)))
        return chunks, loss, zloss, lse, tw

    def backward(self, grad_loss, grad_z_loss, lse, total_weight, gx=None, grad_y=False, layout="contiguous"):
        """(pieces per row or -1, gx, gy); grad_loss and grad_z_loss None: the unit gradient.
        gx: the buffer to write (x itself: in place), else a new one of `layout` (grad_buffer)."""
        x = self.x
        if self.opt.vocab_size >= 0:  # the kernels read (shift, rel) pairs, as the driver gives them
            lse = lse.reshape(x.shape[0], -1)[:, :2].contiguous()
        gx = grad_buffer(x, layout) if gx is None else gx
        gy = grad_buffer(x, layout) if grad_y else None
        grad_dtype = DT[grad_loss.dtype] if grad_loss is not None else 0
        readonly = [t for t in self.inputs() + [grad_loss, grad_z_loss, lse, total_weight] if t is not gx]
        with Watched(self.lib, readonly, [gx, gy]):
            chunks = self.lib.emu_backward(ctypes.byref(self.problem), ctypes.byref(self.options), self.sm,
                                           ptr(grad_loss), ptr(grad_z_loss), grad_dtype, ptr(total_weight),
                                           DT[total_weight.dtype], ptr(lse), ptr(gx), gx.stride(0), ptr(gy),
                                           gy.stride(0) if grad_y else 0)
        return chunks, gx, gy


def run(lib, x, t, w=None, eps=0.0, scale=1.0, cap=0.0, sq=0.0, red=1, sm=132, grad_y=False, gx=None,
        layout="contiguous"):
    """Forward then backward (random upstream gradients) as the driver launches them.
    Returns (pieces per row, loss, z_loss, lse, total_weight, grad_loss, grad_z_loss, gx, gy)."""
    k = Kernels(lib, x, t, w, sm, reduction=red, label_smoothing=eps, logit_scale=scale, softcap=cap or None,
                lse_square_scale=sq)
    chunks, loss, zl, lse, tw = k.forward()
    n = x.shape[0] if red == 0 else 1
    gl = torch.rand(n, dtype=acc_dtype(x)) + 0.5
    gz = torch.rand(n, dtype=acc_dtype(x))
    chunks_b, gx, gy = k.backward(gl, gz, lse, tw, gx, grad_y, layout)
    assert chunks_b == chunks
    return chunks, loss, zl, lse, tw, gl, gz, gx, gy


def test_options_layout_matches_the_ops():
    assert tuple(name for name, _ in Options._fields_) == LossOptions._fields


OPTIONS = [  # prob, weight, label_smoothing, softcap, lse_square_scale, reduction
    (False, False, 0.0, 0.0, 0.0, 1), (False, True, 0.1, 0.0, 0.01, 0), (False, True, 0.0, 5.0, 0.0, 2),
    (True, False, 0.0, 0.0, 0.0, 1), (True, True, 0.2, 3.0, 0.01, 0),
    (False, True, 0.1, 0.0, 0.05, 1)]  # the z-loss's mean over the rows, the cross-entropy's over the weights
SHAPES = [(5, 37, 132), (3, 3001, 1), (2, 9000, 1), (1, 1, 132)]  # rows, classes, SMs (1: split rows)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", range(len(OPTIONS)))
# Row start offsets of logits and targets in their NaN-padded buffers (7 columns wider), and the
# gradients' layout: contiguous (the driver's: misaligned against the logits' rows, narrow
# stores) or the logits' own pitch (16-byte vector stores at an offset).
@pytest.mark.parametrize("offsets", [(0, 0, "contiguous"), (1, 3, "contiguous"), (1, 1, "pitch")])
def test_against_reference(lib, dtype, shape, option, offsets):
    N, C, sm = shape
    prob, has_w, eps, cap, sq, red = OPTIONS[option]
    x = nan_padded((torch.randn(N, C, dtype=torch.float64) * 3).to(dtype), offsets[0], 7 - offsets[0])
    if prob:
        t = nan_padded(torch.softmax(torch.randn(N, C, dtype=torch.float64), 1).to(dtype), offsets[1], 7 - offsets[1])
    else:
        t = torch.randint(0, C, (N,))
        t[1::4] = -100
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype) if has_w else None
    _, loss, zl, _, _, gl, gz, gx, gy = run(lib, x, t, w, eps, 1.3, cap, sq, red, sm, grad_y=prob, layout=offsets[2])
    xr = x.double().requires_grad_()
    yr = t.double().requires_grad_() if prob else t
    rl, rz = reference_cross_entropy(xr, yr, weight=None if w is None else w.double(), reduction=REDUCTIONS[red],
                                     label_smoothing=eps, logit_scale=1.3, softcap=cap or None,
                                     lse_square_scale=sq, return_z_loss=True)
    ((rl * gl.double().reshape(rl.shape)).sum() + (rz * gz.double().reshape(rz.shape)).sum()).backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), rl.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(zl.double(), rz.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), xr.grad.to(dtype).double(), rtol=tol,
                               atol=tol * xr.grad.abs().max().item() * 0.1)
    if prob:
        torch.testing.assert_close(gy.double(), yr.grad.to(dtype).double(), rtol=tol,
                                   atol=tol * yr.grad.abs().max().item() * 0.1)


CPU_CASES = [  # options of the ops, and whether the target holds probabilities / there are weights
    dict(reduction=1),
    dict(reduction=0, label_smoothing=0.1, lse_square_scale=1e-2, weight=True),
    dict(reduction=2, logit_scale=0.7, softcap=4.0, ignore_index=3),
    dict(reduction=0, label_smoothing=0.2, prob=True, weight=True),
    dict(reduction=0, label_smoothing=0.1, class_offset=20, vocab_size=90),  # a vocabulary slice
    dict(reduction=1, softcap=6.0, lse_square_scale=1e-3, class_offset=0, vocab_size=41),
    dict(reduction=1, lse_square_scale=5e-2, weight=True, ignore_index=3),  # two divisors
]


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
@pytest.mark.parametrize("C,sm", [(41, 132), (3001, 1)])
def test_matches_the_cpu_backend(lib, dtype, case, C, sm):
    # One set of rules: the emulated CUDA kernels and the CPU backend's op give the same loss,
    # z-loss, lse, total weight and gradients (up to the order of float sums), loss_dtype too.
    options = dict(CPU_CASES[case])
    prob, weighted = options.pop("prob", False), options.pop("weight", False)
    if options.get("vocab_size", -1) >= 0:
        options["vocab_size"] = max(options["vocab_size"], options["class_offset"] + C)
    opt = LossOptions(**options)
    x = (torch.randn(9, C, dtype=torch.float64) * 3).to(dtype)
    V = opt.vocab_size if opt.vocab_size >= 0 else C
    t = torch.softmax(torch.randn(9, C, dtype=torch.float64), 1).to(dtype) if prob else torch.randint(0, V, (9,))
    if not prob:
        t[::4] = opt.ignore_index
        t[1] = opt.class_offset + C // 2  # at least one target in the slice
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    k = Kernels(lib, x, t, w, sm, **options)
    ops = torch.ops.fastce
    for loss_dtype in (None, torch.float64):
        _, loss, zl, lse, tw = k.forward(loss_dtype)
        ref = ops.cross_entropy_forward(x, t, w, *opt, loss_dtype=loss_dtype)
        tol = TOL[dtype] if loss_dtype is None else TOL[dtype] / 100
        for got, want in zip((loss, zl, lse, tw), ref[:4]):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.double(), want.double().reshape(got.shape), rtol=tol, atol=tol)
    n = 9 if opt.reduction == 0 else 1
    gl, gz = torch.rand(n, dtype=torch.float64) + 0.5, torch.rand(n, dtype=torch.float64)
    _, gx, gy = k.backward(gl, gz, lse, tw, grad_y=prob)
    ref_gx, ref_gy = ops.cross_entropy_backward(gl, gz, x, t, w, lse, tw, *opt, compute_grad_target=prob)
    tol = TOL[dtype]
    torch.testing.assert_close(gx.double(), ref_gx.double(), rtol=tol, atol=tol * ref_gx.double().abs().max().item())
    if prob:
        torch.testing.assert_close(gy.double(), ref_gy.double(), rtol=tol,
                                   atol=tol * ref_gy.double().abs().max().item())


def _slices(classes, cuts):
    bounds = [0, *cuts, classes]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("C,cuts,sm", [(30, [10, 10, 21], 132), (9000, [2500, 7000], 1)])
def test_vocabulary_slices_add_up_to_the_whole(lib, dtype, C, cuts, sm):
    # As parallel.py uses them: each slice's loss against its own lse, merged, is the whole
    # vocabulary's loss; each slice's gradient from the whole lse is its part of the whole
    # gradient, bit for bit (an empty slice included; split rows in the long case).
    x = (torch.randn(7, C, dtype=torch.float64) * 2).to(dtype)
    t = torch.tensor([0, C - 1, -100, 12, 3, 17, 25])
    base = dict(reduction=0, label_smoothing=0.1, logit_scale=0.8, softcap=3.0)
    whole = Kernels(lib, x, t, sm=sm, **base)
    _, whole_loss, _, whole_lse, tw = whole.forward(torch.float64)
    g = torch.rand(7, dtype=torch.float64)
    _, whole_grad, _ = whole.backward(g, torch.zeros_like(g), whole_lse, tw)
    pair = torch.stack([torch.zeros_like(whole_lse), whole_lse], -1)
    merged = torch.zeros(7, dtype=torch.float64)
    for a, b in _slices(C, cuts):
        xs = x[:, a:b]
        k = Kernels(lib, xs, t, sm=sm, class_offset=a, vocab_size=C, **base)
        chunks, loss, _, stats, tw_k = k.forward(torch.float64)
        assert chunks >= 1 and torch.equal(tw_k, tw)
        m, r, w = stats.unbind(-1)
        here = ((t >= a) & (t < b)).double()
        torch.testing.assert_close(w, torch.where(t == -100, 0.0, 0.9 * here + 0.1 * (b - a) / C))
        merged += loss + torch.where(w == 0, 0.0, w * (whole_lse - (m + r)))
        _, grad, _ = k.backward(g, torch.zeros_like(g), pair, tw)
        assert torch.equal(grad, whole_grad[:, a:b])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(merged, whole_loss, rtol=tol, atol=tol)


def test_slice_targets_elsewhere_and_out_of_range(lib):
    x = torch.randn(4, 10)
    k = Kernels(lib, x, torch.tensor([0, 35, -100, 5]), class_offset=10, vocab_size=40)
    chunks, loss, _, lse, tw = k.forward()
    assert chunks == 1 and tw.tolist() == [3, 3]  # a target elsewhere counts as a row of weight 1, and as a row
    for bad in (40, -1):
        k = Kernels(lib, x, torch.tensor([0, bad, 1, 2]), class_offset=10, vocab_size=40)
        assert k.forward()[0] == -1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", [0, 1])
def test_loss_dtype(lib, dtype, reduction):
    # A float64 loss of 16-bit logits carries the float accumulation's error, not the output's.
    x = (torch.randn(6, 500, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, 500, (6,))
    k = Kernels(lib, x, t, reduction=reduction, label_smoothing=0.1)
    ref = reference_cross_entropy(x.double(), t, reduction=REDUCTIONS[reduction], label_smoothing=0.1)
    _, loss, _, _, _ = k.forward(torch.float64)
    _, rounded, _, _, _ = k.forward()
    assert loss.dtype == torch.float64 and rounded.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rounded, ref.to(dtype), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("prob", [False, True])
def test_unit_gradient_is_the_backward_of_ones(lib, dtype, reduction, prob):
    # The forward's compute_grad runs the backward with no incoming gradient (1 and 0): bit for
    # bit what the backward gives for ones and zeros, of any dtype.
    x = (torch.randn(5, 300) * 3).to(dtype)
    t = torch.softmax(torch.randn(5, 300), 1).to(dtype) if prob else torch.tensor([1, -100, 7, 299, 0])
    k = Kernels(lib, x, t, reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-3)
    _, _, _, lse, tw = k.forward()
    _, unit, _ = k.backward(None, None, lse, tw)
    n = 5 if reduction == 0 else 1
    for grad_dtype in (torch.float64, torch.bfloat16):
        ones, zeros = torch.ones(n, dtype=grad_dtype), torch.zeros(n, dtype=grad_dtype)
        assert torch.equal(k.backward(ones, zeros, lse, tw)[1], unit)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("offset,sm", [(0, 1), (1, 132), (3, 1)])  # 16 rows on 1 SM: whole rows
@pytest.mark.parametrize("prob", [False, True])
def test_inplace_backward_matches(lib, dtype, offset, sm, prob):
    # In place over logits whose rows start unaligned (offset) in a NaN-padded buffer, with class
    # weights, softcap and label smoothing or probability targets (misaligned against the
    # logits): bit for bit the out-of-place gradient, and nothing written outside the rows.
    N, C = 16, 4099
    x = nan_padded((torch.randn(N, C) * 3).to(dtype), offset, 5 - offset)
    if prob:
        t = nan_padded(torch.softmax(torch.randn(N, C), 1).to(dtype), 2, 1)
    else:
        t = torch.randint(0, C, (N,))
        t[2] = -100
    w = torch.rand(C) + 0.5
    opts = dict(w=w, eps=0.1, cap=4.0, sq=1e-3, sm=sm)
    torch.manual_seed(3)
    chunks, *_, gx, _ = run(lib, nan_padded(x, offset, 5 - offset), t, **opts)
    assert (chunks > 1) == (sm > 1)
    inplace = nan_padded(x, offset, 5 - offset)
    torch.manual_seed(3)
    run(lib, inplace, t, gx=inplace, **opts)
    assert torch.equal(inplace, gx)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("sm", [132, 1])
def test_gradient_layouts_agree(lib, dtype, sm):
    # x = buf[:, :V] of a padded vocabulary: a contiguous gradient's rows drift against the
    # logits' alignment (narrow stores), one with x's pitch shares it (16-byte stores), in place
    # writes over x: the same bits, for probability targets and their gradient too.
    N, C = 5, 3001
    x = nan_padded((torch.randn(N, C) * 3).to(dtype), 0, 3)
    y = nan_padded(torch.softmax(torch.randn(N, C), 1).to(dtype), 0, 3)
    w = torch.rand(C) + 0.5
    results = {}
    for layout in ("contiguous", "pitch", "inplace"):
        xs = nan_padded(x, 0, 3)
        torch.manual_seed(4)
        *_, gx, gy = run(lib, xs, y, w, eps=0.1, cap=5.0, red=0, sm=sm, grad_y=layout != "inplace",
                         gx=xs if layout == "inplace" else None, layout="contiguous" if layout == "inplace" else layout)
        results[layout] = gx, gy
    assert torch.equal(results["contiguous"][0], results["pitch"][0])
    assert torch.equal(results["contiguous"][1], results["pitch"][1])
    assert torch.equal(results["contiguous"][0], results["inplace"][0])


@pytest.mark.parametrize("dtype,C", [(torch.bfloat16, 110000), (torch.float32, 60000)])
def test_more_than_32_pieces_per_row(lib, dtype, C):
    # merge_kernel's lanes take a second piece each (> 32 pieces per row).
    x = (torch.randn(2, C, dtype=torch.float64) * 2).to(dtype)
    t = torch.tensor([5, C - 1])
    w = torch.rand(C, dtype=torch.float64) + 0.5
    chunks, loss, _, _, _, gl, _, gx, _ = run(lib, x, t, w, eps=0.1, red=0, sm=132)
    assert chunks > 32
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, t, weight=w, reduction="none", label_smoothing=0.1)
    (ref * gl.double()).sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref.detach().to(dtype).double(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), xr.grad.to(dtype).double(), rtol=tol, atol=tol * xr.grad.abs().max().item())


@pytest.mark.parametrize("red", [0, 1, 2])
def test_reduction_over_many_rows(lib, red):
    # More rows than reduce_kernel's 1024 threads, and than a first-stage block takes (two
    # stages of 256 rows under the emulation): the reference's sums, in a fixed order.
    N = 1100
    assert N > 1024 and N > 2 * REDUCE_ROWS_PER_BLOCK
    x = torch.randn(N, 3, dtype=torch.float64)
    t = torch.randint(0, 3, (N,))
    t[::7] = -100
    w = torch.rand(3, dtype=torch.float64) + 0.5
    k = Kernels(lib, x, t, w, reduction=red, lse_square_scale=1e-2)
    _, loss, zl, _, tw = k.forward()
    rl, rz = reference_cross_entropy(x, t, weight=w, reduction=REDUCTIONS[red], lse_square_scale=1e-2,
                                     return_z_loss=True)
    torch.testing.assert_close(loss, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zl, rz, rtol=1e-12, atol=1e-12)
    kept = t != -100
    torch.testing.assert_close(tw[0], w[t[kept]].sum(), rtol=1e-12, atol=0)
    assert tw[1] == kept.sum()


def test_deterministic_split_rows(lib):
    x = torch.randn(3, 20000).bfloat16()
    t = torch.randint(0, 20000, (3,))
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        results.append(run(lib, x, t, eps=0.1, sm=1))
    assert results[0][0] > 1
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][7], results[1][7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,sm", [(32, 1), (8, 1)])  # whole rows; split rows (fewer than 16 rows per SM)
def test_confident_rows_target_gradient(lib, dtype, N, sm):
    V = 32000
    x = torch.randn(N, V) * 0.5
    t = torch.randint(0, V, (N,))
    rows = torch.arange(N)
    x[rows, t] = torch.linspace(12.0, 20.0, N)
    x = x.to(dtype)
    xr = x.double().requires_grad_()
    F.cross_entropy(xr, t, reduction="sum").backward()
    g_ref = xr.grad[rows, t]
    chunks, *_, gl, _, gx, _ = run(lib, x, t, red=2, sm=sm)
    assert (chunks > 1) == (N < 16 * sm)
    ours = gx[rows, t].double() / gl.double()
    fi = torch.finfo(dtype)
    assert torch.all((ours - g_ref).abs() <= (g_ref.abs() * fi.eps).clamp_min(fi.smallest_normal * fi.eps))


def test_out_of_range_target_asserts(lib):
    x = torch.randn(4, 50)
    assert Kernels(lib, x, torch.tensor([1, 2, 50, 3])).forward()[0] == -1
    k = Kernels(lib, x, torch.tensor([1, 2, -5, 3]))
    _, _, _, lse, tw = Kernels(lib, x, torch.tensor([1, 2, 4, 3])).forward()
    assert k.backward(None, None, lse, tw)[0] == -1


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("C,sm,inplace", [(40, 132, False), (40, 132, True), (9000, 1, False), (9000, 1, True)])
@pytest.mark.parametrize("prob", [False, True])
def test_rows_whose_max_is_a_huge_tie(lib, dtype, eps, C, sm, inplace, prob):
    # Rows masked entirely with a huge constant, or whose largest logits tie at a huge value:
    # their max and log-sum are kept apart (recomputed before the gradient, also in place over
    # split rows); torch gives log(k) and 1/k.
    huge = {torch.float64: -1e300, torch.float32: -3e38, torch.bfloat16: -1e30, torch.float16: -65504.0}[dtype]
    x = torch.randn(5, C, dtype=torch.float64).to(dtype)
    x[1] = huge
    x[2, :3] = -huge / 4
    x[3] = 1e12 if dtype in (torch.float32, torch.float64) else huge
    x[4] = -3e5 if dtype != torch.float16 else -6e4  # below 2^19: a float lse would round log(sum) away
    t = torch.softmax(torch.randn(5, C, dtype=torch.float64), 1).to(dtype) if prob else torch.tensor([0, 1, 2, 3, 4])
    gx = x.clone() if inplace else None
    _, loss, _, _, _, gl, _, gx, _ = run(lib, x.clone(), t, eps=eps, red=0, sm=sm, gx=gx)
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, t.double() if prob else t, reduction="none", label_smoothing=eps)
    (ref * gl.double()).sum().backward()
    tol = TOL[dtype]
    # Row 4's loss with smoothing or probability targets subtracts float sums of z from the lse
    # (their rounding, |z| * 2^-24 relative, is not a huge row's): its gradient is checked.
    checked = slice(None) if eps == 0 and not prob else slice(0, 4)
    torch.testing.assert_close(loss.double()[checked], ref.detach().to(dtype).double()[checked], rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), xr.grad.to(dtype).double(), rtol=tol, atol=tol * 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sm", [132, 1])
def test_exp2_flush_to_zero_accuracy(lib, dtype, sm):
    # exp_neg is ex2.approx.ftz on the GPU (common.cuh: exp2_ftz): exp2f's bits down to 2^-126,
    # 0 below. Rows whose logits reach far below their max (probabilities down to e^-150):
    # the loss and lse as float64's, every gradient within the dtype's rounding plus the
    # rounding of its exponent (|z - lse| * 2^-24 relative: exp_neg), and those whose
    # probability is below 2^-126 no larger than it.
    N, C = 6, 3000
    x = torch.rand(N, C, dtype=torch.float64) * -150
    x[:, 7] = 0.0
    x[1] = torch.linspace(-100, 0, C, dtype=torch.float64)  # a ramp through the flush threshold
    x = x.to(dtype)
    t = torch.tensor([7, 5, 7, 2999, 7, 100])
    _, loss, _, lse, _, gl, _, gx, _ = run(lib, x, t, red=0, sm=sm)
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, t, reduction="none")
    (ref * gl.double()).sum().backward()
    torch.testing.assert_close(lse, torch.logsumexp(x.double(), 1), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(loss.double(), ref.detach().to(dtype).double(), rtol=TOL[dtype], atol=1e-6)
    tiny = xr.grad.abs() < 2.0 ** -126
    g, want = gx.double(), xr.grad.to(dtype).double()
    assert torch.all(g[tiny].abs() <= 2.0 ** -126)
    eps = torch.finfo(dtype).eps
    d = (x.double() - lse[:, None]).abs()
    bound = (4 + 2 * d) * eps * want.abs() + 2.0 ** -125  # (the flush threshold itself: either side)
    assert torch.all((g - want)[~tiny].abs() <= bound[~tiny])
