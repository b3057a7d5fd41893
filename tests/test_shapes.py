"""K-dimensional (segmentation) inputs and rows of few classes: the CPU's lanes path (csrc/cpu/lanes.h)
against torch and a float64 reference, at every boundary of the choice of path:

- spatial (N, C, d1..dk) logits kept in their layout: inner = d1*..*dk >= 16 positions at unit
  stride (15 and 16 on either side; one span of 1024 positions and more; inner of 1);
- rows of at most 64 classes (63, 64, 65 on either side), channels_last logits among them;
- strided views (copied into rows), a sliced batch (spatial with a batch stride), expanded logits.
"""
import pytest
import torch
import torch.nn.functional as F

import fastce
from reference import reference_cross_entropy

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (loss, gradient) tolerances against float64 on the same inputs
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 1e-2),
       torch.float16: (4e-3, 2e-3)}

# (shape, what it exercises)
SHAPES = [
    ((2, 5, 4, 4), "spatial, inner 16: the smallest spatial problem"),
    ((2, 5, 3, 5), "inner 15: copied into rows of 5 classes"),
    ((2, 3, 17), "3-D input, inner 17: a vector and a tail"),
    ((3, 7, 33, 37), "inner 1221: two spans per sample"),
    ((2, 40, 9, 9), "40 classes spatial"),
    ((2, 300, 4, 5), "300 classes spatial: exponentials recomputed in the third pass"),
    ((4, 1, 5, 5), "one class"),  # (rows: prepare keeps classes > 1 spatial only)
    ((5, 3, 1), "inner 1: rows"),
    ((2, 4, 3, 3, 3), "3-D volume, inner 27"),
    ((4, 2, 8, 8), "two classes spatial"),
    ((97, 63), "rows, 63 classes"),
    ((97, 64), "rows, 64 classes: the last tiled"),
    ((97, 65), "rows, 65 classes: row kernels"),
    ((1000, 2), "binary rows"),
    ((3, 1), "rows of one class"),
    ((7,), "1-D input"),
]


def make_target(shape, ignore_frac=0.25, ignore_index=-100):
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, C, tshape)
    if ignore_frac and len(shape) > 1:
        t = torch.where(torch.rand(tshape) < ignore_frac, ignore_index, t)
    return t


def assert_close(actual, expected, tol, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, equal_nan=True,
                               msg=lambda m: f"{msg}\n{m}")


def check(x, t, dtype, grad_target=False, fastce_only=None, **kw):
    """fastce on x against float64 (torch's cross_entropy, or the reference for fastce's own
    options): loss, and gradients for a non-uniform incoming gradient and for a unit one."""
    tol_loss, tol_grad = TOL[dtype]
    w = kw.pop("weight", None)
    extra = fastce_only or {}
    xa = x.detach().clone().requires_grad_()
    ta = t.detach().clone().requires_grad_() if grad_target else t
    a = fastce.cross_entropy(xa, ta, weight=w, **kw, **extra)
    xb = x.detach().double().requires_grad_()
    tb = t.detach().double().requires_grad_() if grad_target else (t.double() if t.is_floating_point() else t)
    wb = None if w is None else w.double()
    b = reference_cross_entropy(xb, tb, weight=wb, **kw, **extra) if extra else F.cross_entropy(xb, tb, weight=wb, **kw)
    assert a.shape == b.shape and a.dtype == x.dtype
    assert_close(a, b, tol_loss * 10, f"loss {kw} {extra}")
    if not a.numel():
        return
    go = torch.rand_like(b) + 0.5
    ins_a, ins_b = [xa] + ([ta] if grad_target else []), [xb] + ([tb] if grad_target else [])
    ga = torch.autograd.grad(a, ins_a, go.to(a.dtype))
    gb = torch.autograd.grad(b, ins_b, go, retain_graph=True)
    assert ga[0].shape == x.shape
    assert_close(ga[0], gb[0], tol_grad * 2, f"grad {kw} {extra}")
    if grad_target:
        assert_close(ga[1], gb[1], max(tol_grad * 100, 1e-9), f"target grad {kw} {extra}")
    if a.dim() == 0 and not grad_target:  # the gradient computed in the forward pass
        xa = x.detach().clone().requires_grad_()
        fastce.cross_entropy(xa, t, weight=w, **kw, **extra).backward()
        gb1, = torch.autograd.grad(b, xb)
        assert_close(xa.grad, gb1, tol_grad * 2, f"unit grad {kw} {extra}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_targets(dtype, shape, reduction):
    x = (torch.randn(shape) * 3).to(dtype)
    check(x, make_target(shape), dtype, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (3, 7, 33, 37), (97, 64), (1000, 2), (2, 3, 17), (97, 65)], ids=str)
def test_every_option(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    C = shape[1] if len(shape) > 1 else shape[0]
    t = make_target(shape, ignore_index=1)
    w = torch.rand(C).to(dtype)
    check(x, t, dtype, weight=w, ignore_index=1, label_smoothing=0.15)
    check(x, t, dtype, weight=w, ignore_index=1, reduction="none", label_smoothing=0.3)
    check(x, make_target(shape), dtype, fastce_only=dict(lse_square_scale=1e-2, softcap=4.0, logit_scale=0.7))
    check(x, make_target(shape), dtype, weight=w, reduction="sum", label_smoothing=0.1,
          fastce_only=dict(lse_square_scale=1e-3, logit_scale=1.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (3, 7, 33, 37), (97, 64), (1000, 2), (97, 65)], ids=str)
def test_probability_targets(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    y = torch.softmax(torch.randn(shape), 1).to(dtype)
    w = torch.rand(shape[1]).to(dtype)
    check(x, y, dtype)
    check(x, y, dtype, grad_target=True, label_smoothing=0.2, weight=w)
    check(x, y, dtype, reduction="none", fastce_only=dict(lse_square_scale=1e-2, softcap=5.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 19, 8, 16), (2, 3, 5, 7), (2, 40, 4, 4)], ids=str)
def test_channels_last(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    t = make_target(shape)
    check(x, t, dtype)
    check(x, t, dtype, reduction="none", label_smoothing=0.1)
    # The gradient keeps the logits' layout (no copy into NCHW).
    xa = x.detach().clone().requires_grad_()
    fastce.cross_entropy(xa, t).backward()
    assert xa.grad.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_3d():
    x = torch.randn(2, 4, 6, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    check(x, make_target(x.shape), torch.float32, label_smoothing=0.1)


@pytest.mark.parametrize("view", ["strided positions", "sliced batch", "sliced classes", "expanded batch",
                                  "permuted positions"])
def test_non_contiguous_views(view):
    base = torch.randn(4, 6, 10, 12) * 3
    x = {"strided positions": base[:, :, ::2],
         "sliced batch": base[1:3],
         "sliced classes": base[:, 1:5],
         "expanded batch": base[:1].expand(3, -1, -1, -1),
         "permuted positions": base.transpose(2, 3)}[view]
    check(x, make_target(x.shape), torch.float32, label_smoothing=0.1)
    check(x, make_target(x.shape), torch.float32, reduction="none")


def test_spatial_gradient_is_in_the_input_layout():
    x = torch.randn(2, 5, 8, 8, requires_grad=True)
    fastce.cross_entropy(x, make_target(x.shape)).backward()
    assert x.grad.is_contiguous()


@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (2, 3, 5, 7), (64, 10), (300, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(shape, dtype):
    x = (torch.randn(shape) * 2).to(dtype)
    t = make_target(shape)
    anchor = torch.zeros((), requires_grad=True)
    xa = x.clone() + anchor.to(dtype)  # a non-leaf
    loss = fastce.cross_entropy(xa, t, inplace_backward=True, label_smoothing=0.1)
    g, = torch.autograd.grad(loss * 1.5, xa)
    xb = x.double().requires_grad_()
    gb, = torch.autograd.grad(F.cross_entropy(xb, t, label_smoothing=0.1) * 1.5, xb)
    assert_close(g, gb, TOL[dtype][1] * 2)


def test_huge_inner_size():
    x = torch.randn(1, 3, 1 << 20)
    t = torch.randint(0, 3, (1, 1 << 20))
    check(x, t, torch.float32)


@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (40, 2)], ids=str)
def test_extreme_logits(shape):
    x = torch.randn(shape) * 3
    flat = x.view(-1)
    flat[0], flat[3], flat[7] = -float("inf"), 1e30, -1e30
    x.select(1, 0).fill_(torch.finfo(torch.float32).min / 2) if len(shape) == 4 else None
    t = make_target(shape, ignore_frac=0.0)
    for dtype in [torch.float32, torch.float64]:
        xd = x.to(dtype)
        a = fastce.cross_entropy(xd, t, reduction="none")
        b = F.cross_entropy(xd.double(), t, reduction="none")
        assert_close(a, b, 1e-5)


def test_every_row_a_nan_or_ignored():
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 0, 0] = float("nan")
    t = make_target(x.shape, ignore_frac=0.0)
    t[1] = -100
    a = fastce.cross_entropy(x, t, reduction="none")
    b = F.cross_entropy(x.double(), t, reduction="none")
    assert_close(a, b, 1e-5)
    xa = x.clone().requires_grad_()
    fastce.cross_entropy(xa, t, reduction="sum").backward()
    assert torch.isnan(xa.grad[0, :, 0, 0]).all() and (xa.grad[1] == 0).all()


@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (50, 3)], ids=str)
def test_out_of_bounds_target(shape):
    x = torch.randn(shape)
    t = make_target(shape, ignore_frac=0.0)
    t.view(-1)[-1] = shape[1]
    with pytest.raises(IndexError) as ours:
        fastce.cross_entropy(x, t)
    with pytest.raises(IndexError) as theirs:
        F.cross_entropy(x, t)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("shape", [(3, 7, 33, 37), (5000, 3)], ids=str)
def test_determinism_across_thread_counts(shape):
    x = torch.randn(shape)
    t = make_target(shape)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in [1, 2, 3]:
            torch.set_num_threads(threads)
            for reduction in ["mean", "none"]:
                xa = x.clone().requires_grad_()
                loss = fastce.cross_entropy(xa, t, reduction=reduction, label_smoothing=0.1)
                g, = torch.autograd.grad(loss.sum(), xa)
                results.append((reduction, loss.detach(), g))
    finally:
        torch.set_num_threads(old)
    for red, loss, g in results:
        ref = next(r for r in results if r[0] == red)
        assert torch.equal(loss, ref[1]) and torch.equal(g, ref[2]), red


def _isas():
    import os
    names, old = [], os.environ.get("FASTCE_CPU_ISA")
    for name in ["generic", "avx2", "avx512", "avx512bf16"]:
        os.environ["FASTCE_CPU_ISA"] = name
        if fastce.cpu_isa() == name:
            names.append(name)
    if old is None:
        del os.environ["FASTCE_CPU_ISA"]
    else:
        os.environ["FASTCE_CPU_ISA"] = old
    return names


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_instruction_set(monkeypatch, isa, dtype):
    monkeypatch.setenv("FASTCE_CPU_ISA", isa)
    assert fastce.cpu_isa() == isa
    for shape in [(2, 6, 5, 7), (61, 5)]:
        x = (torch.randn(shape) * 3).to(dtype)
        check(x, make_target(shape), dtype, weight=torch.rand(shape[1]).to(dtype), label_smoothing=0.1)
        check(x, torch.softmax(torch.randn(shape), 1).to(dtype), dtype, grad_target=True)


def test_compiles_without_graph_breaks():
    x = torch.randn(2, 5, 8, 8, requires_grad=True)
    t = make_target(x.shape)
    f = torch.compile(fastce.cross_entropy, fullgraph=True, dynamic=True)
    loss = f(x, t)
    g, = torch.autograd.grad(loss, x)
    xb = x.detach().double().requires_grad_()
    gb, = torch.autograd.grad(F.cross_entropy(xb, t), xb)
    assert_close(g, gb, 1e-5)


def test_bench_shape_group(monkeypatch, capsys):
    # benchmarks/bench.py --group: every shape of the group timed, its loss checked against torch's,
    # fastce's peak memory measured in a child process (no speed is asserted).
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("fastce_benchmarks_bench_shapes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.SHAPE_GROUPS, "shapes-quick", ["2x3x8x8", "64x2", "2x3x4x8:cl"])
    threads = torch.get_num_threads()
    try:
        rows = bench.run_shape_group(bench.parse_args(["--group", "shapes-quick", "--variants", "eager,fastce",
                                                       "--repeats", "2", "--threads", "1"]))
    finally:
        torch.set_num_threads(threads)
    assert {(r["shape"], r["variant"]) for r in rows} == {(s, v) for s in ["2x3x8x8", "64x2", "2x3x4x8:cl"]
                                                         for v in ["eager", "fastce"]}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), [r["status"] for r in rows]
    assert all(r["peak_extra_ratio"] is not None for r in rows)
    out = capsys.readouterr().out
    assert "2x3x4x8 channels_last" in out and "x eager" in out
    logits, _ = bench.shape_case("2x3x4x8:cl", "float32")
    assert logits.is_contiguous(memory_format=torch.channels_last)
