"""fastce.cross_entropy against torch.nn.functional.cross_entropy: results and gradients."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastce
from reference import reference_cross_entropy

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (loss tolerance, gradient tolerance) against a float64 computation on the same inputs
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (4e-3, 2e-3),
}
SHAPES = [(17,), (1, 1), (6, 1), (5, 3), (13, 17), (9, 1000), (3, 4099), (2, 5, 3), (2, 4, 3, 2), (0, 5)]


def class_dim(shape):
    return 0 if len(shape) == 1 else 1


def make_target(shape, device, ignore_frac=0.0, ignore_index=-100, dtype=torch.long):
    C = shape[class_dim(shape)]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, C, tshape, device=device)
    if ignore_frac:
        t = torch.where(torch.rand(tshape, device=device) < ignore_frac, ignore_index, t)
    return t.to(dtype)


def assert_close(actual, expected, tol, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, equal_nan=True,
                               msg=lambda m: f"{msg}\n{m}")


def run_both(x, target, grad_target=False, **kw):
    """fastce on x, and float64 torch on the same values; returns (losses, grads)."""
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().double().requires_grad_()
    ta, tb = target, target
    if grad_target:
        ta = target.detach().clone().requires_grad_()
        tb = target.detach().double().requires_grad_()
    elif target.is_floating_point():
        tb = target.double()
    w = kw.pop("weight", None)
    a = fastce.cross_entropy(xa, ta, weight=w, **kw)
    b = F.cross_entropy(xb, tb, weight=None if w is None else w.double(), **kw)
    assert a.shape == b.shape and a.dtype == x.dtype
    go = torch.rand_like(b) + 0.5  # non-uniform incoming gradient
    inputs_a = [xa] + ([ta] if grad_target else [])
    inputs_b = [xb] + ([tb] if grad_target else [])
    ga = torch.autograd.grad(a, inputs_a, go.to(a.dtype)) if a.numel() else [torch.zeros_like(i) for i in inputs_a]
    gb = torch.autograd.grad(b, inputs_b, go) if b.numel() else [torch.zeros_like(i) for i in inputs_b]
    return a, b, ga, gb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_class_targets(device, dtype, shape, reduction):
    x = torch.randn(shape, device=device).mul(3).to(dtype)
    C = shape[class_dim(shape)]
    weight = (torch.rand(C, device=device) + 0.1).to(dtype)
    tol_loss, tol_grad = TOL[dtype]
    for w, ls, ignore in itertools.product([None, weight], [0.0, 0.15], [False, True]):
        ignore_index = (C // 2 if C > 1 else -100) if ignore else -100
        t = make_target(shape, device, 0.3 if ignore else 0.0, ignore_index)
        a, b, (ga,), (gb,) = run_both(x, t, weight=w, reduction=reduction, label_smoothing=ls,
                                       ignore_index=ignore_index)
        what = f"weight={w is not None} ls={ls} ignore={ignore_index}"
        assert_close(a, b, tol_loss * max(1.0, b.abs().max().item() if b.numel() else 1.0), what)
        assert_close(ga, gb, tol_grad * max(1.0, gb.abs().max().item() if gb.numel() else 1.0), what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(11,), (6, 1), (5, 3), (9, 1000), (2, 5, 3), (0, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_probability_targets(device, dtype, shape, reduction):
    x = torch.randn(shape, device=device).mul(2).to(dtype)
    C = shape[class_dim(shape)]
    tol_loss, tol_grad = TOL[dtype]
    for normalized, w, ls in itertools.product([True, False], [None, torch.rand(C, device=device).to(dtype)], [0.0, 0.2]):
        y = torch.rand(shape, device=device)
        if normalized:
            y = y / y.sum(class_dim(shape), keepdim=True).clamp_min(1e-6)
        y = y.to(dtype)
        a, b, ga, gb = run_both(x, y, grad_target=True, weight=w, reduction=reduction, label_smoothing=ls)
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        assert_close(a, b, tol_loss * scale, f"norm={normalized} w={w is not None} ls={ls}")
        for g1, g2, name in zip(ga, gb, ["input", "target"]):
            assert_close(g1, g2, tol_grad * max(1.0, g2.abs().max().item() if g2.numel() else 1.0), name)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "every_other_row", "expanded_rows", "kdim_permuted"])
def test_non_contiguous_inputs(device, layout):
    if layout == "transposed":
        x = torch.randn(37, 8, device=device).t()
    elif layout == "row_slice":
        x = torch.randn(8, 50, device=device)[:, 3:40]
    elif layout == "every_other_row":
        x = torch.randn(16, 37, device=device)[::2]
    elif layout == "expanded_rows":
        x = torch.randn(1, 37, device=device).expand(8, 37)
    else:
        x = torch.randn(2, 3, 37, device=device).permute(0, 2, 1)
    t = make_target(tuple(x.shape), device)
    a, b, (ga,), (gb,) = run_both(x, t, reduction="none", label_smoothing=0.1)
    assert_close(a, b, 1e-5)
    assert_close(ga, gb, 1e-6)


@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.uint8])
def test_target_dtypes(device, tdtype):
    x = torch.randn(10, 7, device=device)
    t = make_target((10, 7), device, dtype=tdtype)
    a = fastce.cross_entropy(x, t)
    b = F.cross_entropy(x, t.long())
    assert_close(a, b, 1e-6)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 3, 12345])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ignore_index_values(device, ignore_index, reduction):
    x = torch.randn(20, 6, device=device)
    t = torch.randint(0, 6, (20,), device=device)
    t[::3] = ignore_index if ignore_index < 0 or ignore_index >= 6 else t[::3]
    a, b, (ga,), (gb,) = run_both(x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1)
    assert_close(a, b, 1e-5)
    assert_close(ga, gb, 1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_every_row_ignored(device, reduction):
    x = torch.randn(5, 4, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    a = fastce.cross_entropy(x, t, reduction=reduction)
    b = F.cross_entropy(x, t, reduction=reduction)
    assert_close(a, b, 0)  # NaN for mean, like torch
    a.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("size_average,reduce", [(None, None), (True, None), (False, None), (None, False),
                                                  (True, False), (False, True), (True, True)])
def test_legacy_reduction_args(device, size_average, reduce):
    x = torch.randn(6, 5, device=device)
    t = make_target((6, 5), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the legacy arguments are deprecated
        b = F.cross_entropy(x, t, None, size_average, -100, reduce)
    a = fastce.cross_entropy(x, t, None, size_average, -100, reduce)
    assert_close(a, b, 1e-6)


def test_positional_signature_matches_torch():
    import inspect
    ours = inspect.signature(fastce.cross_entropy).parameters
    theirs = inspect.signature(F.cross_entropy).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
    for name in list(ours)[len(theirs):]:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_worked_example_from_the_seed():
    score = torch.tensor([0.8982, 0.805, 0.6393, 0.9983, 0.5731, 0.0469, 0.556, 0.1476, 0.8404, 0.5544])
    by_hand = torch.log(torch.sum(torch.exp(score))) - score[1]
    assert torch.allclose(fastce.cross_entropy(score, torch.tensor(1)), by_hand, atol=1e-6)
    batch, target = torch.randn(64, 10), torch.randint(0, 10, (64,))
    per_row = fastce.cross_entropy(batch, target, reduction="none")
    assert per_row.shape == (64,)
    assert torch.allclose(fastce.cross_entropy(batch, target), per_row.mean(), atol=1e-6)


def test_module_is_a_drop_in(device):
    w = torch.rand(7, device=device)
    ours = fastce.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    for attr in ["ignore_index", "reduction", "label_smoothing"]:
        assert getattr(ours, attr) == getattr(theirs, attr)
    assert "weight" in dict(ours.named_buffers())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    fresh = fastce.CrossEntropyLoss(weight=torch.zeros(7, device=device))
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, w)
    x, t = torch.randn(9, 7, device=device), make_target((9, 7), device)
    assert_close(ours(x, t), theirs(x, t), 1e-5)
    legacy = fastce.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"


@pytest.mark.parametrize("dtype, options", [(torch.float32, "weight_smooth"), (torch.float32, "plain"),
                                            (torch.bfloat16, "plain")])
def test_determinism_across_thread_counts(dtype, options):
    # Many rows and rows longer than one piece (32768), so both parallel paths are used.
    x = torch.randn(64, 70001).to(dtype).requires_grad_()
    t = torch.randint(0, 70001, (64,))
    kw = dict(weight=torch.rand(70001).to(dtype), label_smoothing=0.1) if options == "weight_smooth" else {}
    results = []
    old = torch.get_num_threads()
    try:
        for threads in [1, 2, 3]:
            torch.set_num_threads(threads)
            for reduction in ["mean", "none"]:
                loss = fastce.cross_entropy(x, t, reduction=reduction, **kw)
                g, = torch.autograd.grad(loss.sum(), x)
                results.append((threads, reduction, loss.detach(), g))
    finally:
        torch.set_num_threads(old)
    for th, red, loss, g in results:
        ref = next(r for r in results if r[1] == red)
        assert torch.equal(loss, ref[2]) and torch.equal(g, ref[3]), (th, red)


def supported_isas():
    import os
    names = []
    old = os.environ.get("FASTCE_CPU_ISA")
    for name in ["generic", "avx2", "avx512", "avx512bf16"]:
        os.environ["FASTCE_CPU_ISA"] = name
        if fastce.cpu_isa() == name:
            names.append(name)
    if old is None:
        del os.environ["FASTCE_CPU_ISA"]
    else:
        os.environ["FASTCE_CPU_ISA"] = old
    return names


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_instruction_set(monkeypatch, isa, dtype):
    monkeypatch.setenv("FASTCE_CPU_ISA", isa)
    assert fastce.cpu_isa() == isa
    x = (torch.randn(7, 3001) * 4).to(dtype)
    x[0, 5] = -float("inf")  # masked logit
    t = make_target((7, 3001), "cpu")
    w = torch.rand(3001).to(dtype)
    tol_loss, tol_grad = TOL[dtype]
    for kw in [dict(), dict(weight=w, label_smoothing=0.2), dict(reduction="none", label_smoothing=0.1)]:
        a, b, (ga,), (gb,) = run_both(x, t, **kw)
        assert_close(a, b, tol_loss * 10, f"{isa} {kw.keys()}")
        assert_close(ga, gb, tol_grad, f"{isa} {kw.keys()}")
    y = torch.softmax(torch.randn(7, 3001), 1).to(dtype)
    a, b, ga, gb = run_both(x.clamp_min(-100), y, grad_target=True, label_smoothing=0.1)
    assert_close(a, b, tol_loss * 10)
    assert_close(ga[0], gb[0], tol_grad)
    assert_close(ga[1], gb[1], tol_grad * 100)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients_are_correctly_rounded(monkeypatch, isa, dtype):
    # 16-bit rows use a shorter exponential (relative error < 3e-6, far below their half-ulp):
    # nearly every gradient must be the exact rounding of the float64 one, the rest 1 ulp off.
    monkeypatch.setenv("FASTCE_CPU_ISA", isa)
    x = (torch.randn(64, 4099) * 3).to(dtype)
    t = torch.randint(0, 4099, (64,))
    xg = x.clone().requires_grad_()
    fastce.cross_entropy(xg, t, reduction="sum").backward()
    ref = torch.softmax(x.double(), 1)
    ref[torch.arange(64), t] -= 1
    ref = ref.to(dtype)
    assert (xg.grad == ref).double().mean() > 0.998
    ulps = (xg.grad.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert ulps.max() <= 1


@pytest.mark.parametrize("isa", [i for i in supported_isas() if i.startswith("avx512")])
def test_subnormal_bfloat16_gradients_are_kept(monkeypatch, isa):
    # AVX512-BF16's conversion flushes subnormals to zero; those vectors take the exact path.
    monkeypatch.setenv("FASTCE_CPU_ISA", isa)
    # 77 classes: two 32-wide steps (even and odd logits apart), then a 16-wide one and a tail.
    x = torch.full((2, 77), -200.0)
    x[:, 0] = 0.0
    x[0, 1], x[0, 17], x[1, 5] = -88.0, -90.0, -91.5  # probabilities below 2^-126
    x[0, 40], x[1, 62], x[1, 70], x[1, 75] = -89.0, -92.0, -88.5, -90.5
    x = x.to(torch.bfloat16).requires_grad_()
    fastce.cross_entropy(x, torch.tensor([0, 0]), reduction="sum").backward()
    ref = torch.softmax(x.detach().double(), 1)
    ref[:, 0] -= 1
    ref = ref.to(torch.bfloat16)
    tiny = ref.abs() < torch.finfo(torch.float32).tiny
    assert (ref[tiny] != 0).sum() == 7
    assert torch.equal(x.grad[tiny], ref[tiny])
    assert torch.equal(x.grad, ref)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("c", [1, 2, 31, 32, 33, 95, 4095, 4096, 4097, 2 * 4096 + 45])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bfloat16_rows_of_every_length(monkeypatch, isa, c, smoothing):
    # Plain bfloat16 rows take 32 logits a step on AVX-512 (the max from their bits, the
    # gradient stored from even and odd halves; with smoothing the sum of the logits too):
    # lengths around 32 and the 4096-logit block, rows all negative (their max the one of
    # least magnitude), rows whose max is -0 or +0.
    monkeypatch.setenv("FASTCE_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(c)
    x = torch.randn(6, c, generator=gen) * 3
    x[1] = -x[1].abs() - 5
    x[2] = -x[2].abs()
    x[2, c // 2] = -0.0
    x[3] = -x[3].abs()
    x[3, c - 1] = 0.0
    x[4] = x[4] * 30
    x = x.to(torch.bfloat16)
    t = torch.randint(0, c, (6,), generator=gen)
    xg = x.clone().requires_grad_()
    loss = fastce.cross_entropy(xg, t, reduction="none", label_smoothing=smoothing)
    loss.sum().backward()
    x64 = x.double().requires_grad_()
    ref_loss = F.cross_entropy(x64, t, reduction="none", label_smoothing=smoothing)
    ref, = torch.autograd.grad(ref_loss.sum(), x64)
    ref_loss, ref = ref_loss.detach().to(torch.bfloat16), ref.to(torch.bfloat16)
    tiny = torch.finfo(torch.float32).tiny  # below it generic and AVX2 give 0 (see vexp)
    for ours, theirs in [(loss.detach(), ref_loss), (xg.grad, ref)]:
        normal = theirs.abs() >= tiny
        ulps = (ours[normal].view(torch.int16).int() - theirs[normal].view(torch.int16).int()).abs()
        assert (ulps <= 1).all(), (isa, c)
        assert ulps.numel() == 0 or (ulps == 0).double().mean() > 0.99, (isa, c)
        assert ((ours[~normal].double() - theirs[~normal].double()).abs() < tiny).all(), (isa, c)


@pytest.mark.parametrize("options", [dict(), dict(reduction="none", label_smoothing=0.1),
                                     dict(reduction="sum", lse_square_scale=1e-3, softcap=3.0)], ids=str)
def test_public_path_matches_the_registered_autograd(options):
    # fastce.cross_entropy applies an autograd.Function; a direct call of the op uses the
    # autograd registered with torch.library. Both are the same formula: the same bits.
    from fastce._ops import REDUCTIONS, LossOptions
    x = torch.randn(37, 1001)
    t = torch.randint(0, 1001, (37,))
    opts = LossOptions(**{**options, "reduction": REDUCTIONS[options.get("reduction", "mean")]})
    results = []
    for call in (lambda z: fastce.cross_entropy(z, t, **options),
                 lambda z: torch.ops.fastce.cross_entropy_forward(z, t, None, *opts)[0]):
        h = (x * 1.0).requires_grad_()
        loss = call(h * 1.0)
        go = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
        loss.backward(go)
        results.append((loss.detach(), h.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_unknown_isa_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTCE_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="FASTCE_CPU_ISA=sse9"):
        fastce.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.3), dict(reduction="none"),
                                     dict(reduction="sum", ignore_index=1)], ids=str)
def test_gradcheck_float64(device, options):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 4, 2], device=device)
    w = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    assert torch.autograd.gradcheck(lambda x: fastce.cross_entropy(x, t, weight=w, **options), (x,))
    y = torch.softmax(torch.randn(4, 5, dtype=torch.float64, device=device), 1).requires_grad_()
    opts = {k: v for k, v in options.items() if k != "ignore_index"}
    assert torch.autograd.gradcheck(lambda x, y: fastce.cross_entropy(x, y, weight=w, **opts), (x, y))


def test_double_backward_matches_torch():
    # (tests/test_double_backward.py and tests/test_transforms.py cover every option)
    x = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for fn in (fastce.cross_entropy, F.cross_entropy):
        xr = x.clone().requires_grad_()
        g, = torch.autograd.grad(fn(xr, torch.tensor([0, 1, 2])), xr, create_graph=True)
        (g * g).sum().backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_a_tensor_that_escaped_a_torch_func_transform():
    # It is still the transform's wrapper; torch (and autograd.Function.apply) unwrap it: the
    # eager fast path leaves such calls to the registered path, which gives torch's result.
    captured = []

    def f(v):
        captured.append(v)
        return v.sum()
    torch.func.grad(f)(torch.randn(4, 6))
    escaped, t = captured[0], torch.tensor([0, 1, 5, 2])
    ours, ref = fastce.cross_entropy(escaped, t), F.cross_entropy(escaped, t)
    assert ours.requires_grad == ref.requires_grad
    torch.testing.assert_close(ours, ref)
