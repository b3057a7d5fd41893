"""torch.func transforms, forward-mode AD and higher-order derivatives of fastce's losses,
against torch's F.cross_entropy (torch's options) or the float64 reference (fastce's LLM
options), on fresh random inputs in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastce
from reference import reference_cross_entropy

C = 7


def _index(shape, gen, ignore=False):
    t = torch.randint(0, C, shape, generator=gen)
    if ignore:
        t.view(-1)[::3] = -100
    return t


def _prob(shape, gen):
    return torch.rand(shape, generator=gen, dtype=torch.float64).softmax(dim=1)


def _weight(gen):
    return torch.rand(C, generator=gen, dtype=torch.float64) + 0.5


# name: (input shape, target(gen), kwargs(gen), uses fastce's LLM options)
CASES = {
    "index_mean": ((6, C), lambda g: _index((6,), g), lambda g: {}, False),
    "index_weight_ignore_smoothing_mean": (
        (6, C), lambda g: _index((6,), g, ignore=True),
        lambda g: dict(weight=_weight(g), label_smoothing=0.2), False),
    "index_weight_ignore_sum": (
        (6, C), lambda g: _index((6,), g, ignore=True), lambda g: dict(weight=_weight(g), reduction="sum"), False),
    "index_smoothing_none": ((6, C), lambda g: _index((6,), g, ignore=True),
                             lambda g: dict(label_smoothing=0.1, reduction="none"), False),
    "prob_weight_smoothing_mean": ((5, C), lambda g: _prob((5, C), g),
                                   lambda g: dict(weight=_weight(g), label_smoothing=0.15), False),
    "prob_none": ((5, C), lambda g: _prob((5, C), g), lambda g: dict(reduction="none"), False),
    "kdim_mean": ((3, C, 4), lambda g: _index((3, 4), g, ignore=True), lambda g: dict(weight=_weight(g)), False),
    "kdim_prob_none": ((3, C, 2), lambda g: _prob((3, C, 2), g), lambda g: dict(reduction="none"), False),
    "unbatched": ((C,), lambda g: torch.tensor(3), lambda g: dict(label_smoothing=0.1), False),
    "llm_index": ((6, C), lambda g: _index((6,), g, ignore=True),
                  lambda g: dict(weight=_weight(g), label_smoothing=0.1, logit_scale=0.7, softcap=2.5,
                                 lse_square_scale=0.05), True),
    "llm_prob_none": ((5, C), lambda g: _prob((5, C), g),
                      lambda g: dict(reduction="none", softcap=1.5, lse_square_scale=0.1, label_smoothing=0.2),
                      True),
    "llm_kdim_sum": ((3, C, 2), lambda g: _index((3, 2), g),
                     lambda g: dict(reduction="sum", logit_scale=1.3, lse_square_scale=0.02), True),
}


def make(case, seed=0):
    """x, target, kwargs, ours(x, target), theirs(x, target)."""
    shape, target, kwargs, llm = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    t = target(gen)
    kw = kwargs(gen)
    theirs_fn = reference_cross_entropy if llm else F.cross_entropy

    def ours(x, t):
        return fastce.cross_entropy(x, t, **kw)

    def theirs(x, t):
        return theirs_fn(x, t, **kw)
    return x, t, kw, ours, theirs


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _prob_case(t):
    return t.is_floating_point()


@pytest.mark.parametrize("case", CASES)
def test_jvp(case):
    x, t, _, ours, theirs = make(case)
    tx = torch.randn_like(x)
    (lo, to), (lt, tt) = (jvp(lambda x: fn(x, t), (x,), (tx,)) for fn in (ours, theirs))
    close(lo, lt)
    close(to, tt)
    assert to.abs().sum() > 0
    if _prob_case(t):  # a tangent in the target as well
        ty = torch.randn_like(t)
        got = jvp(ours, (x, t), (tx, ty))[1]
        close(got, jvp(theirs, (x, t), (tx, ty))[1])


@pytest.mark.parametrize("case", CASES)
def test_forward_ad(case):
    x, t, _, ours, theirs = make(case)
    tx, ty = torch.randn_like(x), (torch.randn_like(t) if _prob_case(t) else None)

    def tangent(fn):
        with fwAD.dual_level():
            dual_t = t if ty is None else fwAD.make_dual(t, ty)
            out = fwAD.unpack_dual(fn(fwAD.make_dual(x, tx), dual_t))
        return out.primal, out.tangent

    (lo, to), (lt, tt) = tangent(ours), tangent(theirs)
    assert to is not None
    close(lo, lt)
    close(to, tt)


@pytest.mark.parametrize("case", CASES)
def test_reverse_transforms(case):
    x, t, _, ours, theirs = make(case)
    for transform in (jacrev, jacfwd):
        close(transform(ours)(x, t), transform(theirs)(x, t))
    if x.dim() and _prob_case(t):
        close(jacrev(ours, argnums=(0, 1))(x, t), jacrev(theirs, argnums=(0, 1))(x, t))
    out_o, vjp_o = vjp(lambda x: ours(x, t), x)
    out_t, vjp_t = vjp(lambda x: theirs(x, t), x)
    v = torch.randn_like(out_t)
    close(vjp_o(v)[0], vjp_t(v)[0])
    loss_o = lambda x: ours(x, t).sum()  # noqa: E731
    loss_t = lambda x: theirs(x, t).sum()  # noqa: E731
    close(grad(loss_o)(x), grad(loss_t)(x))


@pytest.mark.parametrize("case", CASES)
def test_vmap(case):
    """vmap over a batch of problems: each entry keeps its own 'mean' divisor."""
    shape, *_ = CASES[case]
    batch = [make(case, seed) for seed in range(3)]
    xs = torch.stack([b[0] for b in batch])
    ts = torch.stack([b[1] for b in batch])
    _, _, _, ours, theirs = batch[0]
    close(vmap(ours)(xs, ts), torch.stack([theirs(x, t) for x, t in zip(xs, ts)]))

    def loss(fn):
        return lambda x, t: fn(x, t).sum()
    per_sample = vmap(grad(loss(ours)))(xs, ts)
    close(per_sample, torch.stack([grad(loss(theirs))(x, t) for x, t in zip(xs, ts)]))
    # the same target for every entry (in_dims None)
    close(vmap(grad(loss(ours)), in_dims=(0, None))(xs, ts[0]),
          torch.stack([grad(loss(theirs))(x, ts[0]) for x in xs]))


@pytest.mark.parametrize("case", CASES)
def test_second_order(case):
    x, t, _, ours, theirs = make(case)
    v = torch.randn_like(x)

    def loss(fn):
        return lambda x: fn(x, t).sum()
    # Hessian-vector product: forward over reverse, and double backward
    close(jvp(grad(loss(ours)), (x,), (v,))[1], jvp(grad(loss(theirs)), (x,), (v,))[1])

    def double_backward(fn):
        xr = x.clone().requires_grad_()
        g, = torch.autograd.grad(loss(fn)(xr), xr, create_graph=True)
        return torch.autograd.grad((g * v).sum(), xr)[0]
    close(double_backward(ours), double_backward(theirs))
    close(hessian(loss(ours))(x), hessian(loss(theirs))(x))
    close(jacrev(jacrev(loss(ours)))(x), jacrev(jacrev(loss(theirs)))(x))
    close(jacrev(jacfwd(loss(ours)))(x), jacrev(jacfwd(loss(theirs)))(x))


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_gradgradcheck_forward_ad(case):
    x, t, _, ours, _ = make(case)
    x = x.requires_grad_()
    if _prob_case(t):
        t = t.clone().requires_grad_()
        args, fn = (x, t), ours
    else:
        args, fn = (x,), lambda x: ours(x, t)
    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("case", ["llm_index", "llm_prob_none", "llm_kdim_sum"])
def test_z_loss_output_and_incoming_gradient_derivatives(case):
    """The z-loss output's tangent, and second derivatives through both incoming gradients."""
    x, t, kw, _, _ = make(case)
    tx = torch.randn_like(x)

    def both(fn):
        return lambda x: fn(x, t, **kw, return_z_loss=True)
    got = jvp(both(fastce.cross_entropy), (x,), (tx,))[1]
    want = jvp(both(reference_cross_entropy), (x,), (tx,))[1]
    for a, b in zip(got, want):
        close(a, b)

    def second(fn):
        xr = x.clone().requires_grad_()
        loss, z_loss = both(fn)(xr)
        g_loss = torch.full_like(loss, 0.7).requires_grad_()
        g_z_loss = torch.full_like(z_loss, 0.3).requires_grad_()
        gx, = torch.autograd.grad((loss, z_loss), xr, (g_loss, g_z_loss), create_graph=True)
        return (gx, *torch.autograd.grad((gx * tx).sum(), (xr, g_loss, g_z_loss)))
    for a, b in zip(second(fastce.cross_entropy), second(reference_cross_entropy)):
        close(a, b)


def test_nested_forward_mode_raises():
    x, t, _, ours, _ = make("index_mean")
    with pytest.raises(NotImplementedError, match="forward-mode AD over forward-mode AD"):
        jacfwd(jacfwd(lambda x: ours(x, t)))(x)


def test_weight_tangent_raises():
    x, t, kw, _, _ = make("index_weight_ignore_sum")
    w = kw.pop("weight")
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        jvp(lambda w: fastce.cross_entropy(x, t, weight=w, **kw), (w,), (torch.ones_like(w),))


def test_module():
    x, t, _, _, _ = make("index_weight_ignore_smoothing_mean")
    mod = fastce.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    tx = torch.randn_like(x)
    close(jvp(lambda x: mod(x, t), (x,), (tx,))[1], jvp(lambda x: ref(x, t), (x,), (tx,))[1])
    close(hessian(lambda x: mod(x, t))(x), hessian(lambda x: ref(x, t))(x))
    xs = torch.randn(4, *x.shape, dtype=torch.float64)
    close(vmap(grad(lambda x: mod(x, t)))(xs), vmap(grad(lambda x: ref(x, t)))(xs))


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 16, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(16, C, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "module", "llm"])
def test_per_sample_gradients_of_mlp(loss_name):
    """DP-SGD style: vmap(grad(functional_call)) over samples equals a loop of backward passes."""
    model = _MLP()
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, C, (8,), generator=gen)
    targets[2] = -100
    kw = dict(softcap=3.0, lse_square_scale=0.01) if loss_name == "llm" else dict(label_smoothing=0.1)
    loss_fn = fastce.CrossEntropyLoss(**kw) if loss_name == "module" else lambda z, y: fastce.cross_entropy(z, y, **kw)

    def sample_loss(params, x, y):
        return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, data, targets)
    for i in range(8):
        model.zero_grad()
        logits = model(data[i:i + 1])
        reference_cross_entropy(logits, targets[i:i + 1], **kw).backward()
        for name, p in model.named_parameters():  # (the ignored sample: as torch's mean over nothing)
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-9, atol=1e-11, equal_nan=True)


# ---- linear_cross_entropy -----------------------------------------------------------------

LINEAR_CASES = {
    "mean": dict(),
    "sum_weight_smoothing": dict(reduction="sum", label_smoothing=0.1, weight="w"),
    "none_llm": dict(reduction="none", softcap=2.0, lse_square_scale=0.05, logit_scale=0.8),
}


def make_linear(case, bias=True):
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    W = torch.randn(C, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64) if bias else None
    y = _index((6,), gen, ignore=True)
    kw = dict(LINEAR_CASES[case])
    if kw.get("weight") == "w":
        kw["weight"] = _weight(gen)

    def ours(h, W, b):
        return fastce.linear_cross_entropy(h, W, y, linear_bias=b, **kw)

    def theirs(h, W, b):
        return reference_cross_entropy(F.linear(h, W, b), y, **kw)
    return (h, W, b), ours, theirs


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_transforms(case):
    args, ours, theirs = make_linear(case)
    tangents = tuple(torch.randn_like(a) for a in args)
    close(jvp(ours, args, tangents)[1], jvp(theirs, args, tangents)[1])
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)))).tangent
    close(got, jvp(theirs, args, tangents)[1])

    def total(fn):
        return lambda *a: fn(*a).sum()
    for argnums in (0, 1, 2):
        close(grad(total(ours), argnums=argnums)(*args), grad(total(theirs), argnums=argnums)(*args))
    close(jacrev(ours, argnums=(0, 1))(*args), jacrev(theirs, argnums=(0, 1))(*args))
    close(hessian(total(ours))(*args), hessian(total(theirs))(*args))
    hs = torch.randn(3, *args[0].shape, dtype=torch.float64)
    close(vmap(grad(total(ours)), in_dims=(0, None, None))(hs, *args[1:]),
          vmap(grad(total(theirs)), in_dims=(0, None, None))(hs, *args[1:]))


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_double_backward(case):
    args, ours, theirs = make_linear(case)
    v = tuple(torch.randn_like(a) for a in args)

    def hvp(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), create_graph=True)
        return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, v)), leaves)
    for a, b in zip(hvp(ours), hvp(theirs)):
        close(a, b)
    leaves = tuple(a.clone().requires_grad_() for a in args)
    assert torch.autograd.gradgradcheck(ours, leaves)


def test_linear_kdim_and_probability_targets():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    W = torch.randn(C, 2, 4, generator=gen, dtype=torch.float64)
    y = _index((5, 2), gen, ignore=True)
    yp = _prob((5, C), gen)
    W2 = torch.randn(C, 4, generator=gen, dtype=torch.float64)
    problems = [  # (ours, theirs, linear weight)
        (lambda h, W: fastce.linear_cross_entropy(h, W, y, label_smoothing=0.1),
         lambda h, W: F.cross_entropy(F.linear(h, W.reshape(-1, 4)).view(5, C, 2), y, label_smoothing=0.1), W),
        (lambda h, W: fastce.linear_cross_entropy(h, W, yp, reduction="sum"),
         lambda h, W: F.cross_entropy(F.linear(h, W), yp, reduction="sum"), W2),
    ]
    for ours, theirs, weight in problems:
        args = (h, weight)
        tangents = tuple(torch.randn_like(a) for a in args)
        close(jvp(ours, args, tangents)[1], jvp(theirs, args, tangents)[1])
        close(hessian(ours, argnums=(0, 1))(*args), hessian(theirs, argnums=(0, 1))(*args))


# ---- the first-order eager path stays the fast one ------------------------------------------

def test_plain_backward_takes_no_second_order_machinery():
    x, t, _, _, _ = make("index_mean")
    x = x.float().requires_grad_()
    loss = fastce.cross_entropy(x, t)
    assert type(loss.grad_fn).__name__ == "_CrossEntropyEagerBackward"  # plain eager's Function
    seen = []
    from fastce import _ops
    original = _ops._LossGradient.apply
    _ops._LossGradient.apply = lambda *a: seen.append(1) or original(*a)
    try:
        loss.backward()
    finally:
        _ops._LossGradient.apply = original
    assert not seen


@pytest.mark.parametrize("case", ["index_weight_ignore_smoothing_mean", "prob_none", "kdim_mean", "llm_index"])
def test_chunked_directional_sums(case, monkeypatch):
    """Forward-mode tangents and second derivatives over several row chunks."""
    from fastce import _ops
    monkeypatch.setattr(_ops, "_DIRECTIONAL_CHUNK_ELEMENTS", 2 * C)
    x, t, _, ours, theirs = make(case)
    tx = torch.randn_like(x)
    close(jvp(lambda x: ours(x, t), (x,), (tx,))[1], jvp(lambda x: theirs(x, t), (x,), (tx,))[1])
    close(jvp(grad(lambda x: ours(x, t).sum()), (x,), (tx,))[1], jvp(grad(lambda x: theirs(x, t).sum()), (x,), (tx,))[1])
    if _prob_case(t):
        ty = torch.randn_like(t)
        close(jvp(ours, (x, t), (tx, ty))[1], jvp(theirs, (x, t), (tx, ty))[1])


# ---- torch.compile -------------------------------------------------------------------------

def test_transforms_and_torch_compile():
    """A transform inside a compiled function graph-breaks at the loss (runs eagerly); a
    transform of a compiled function works."""
    x, t, _, ours, theirs = make("llm_kdim_sum")
    x = x.float()
    v = torch.randn_like(x)

    def loss(fn):
        return lambda x: fn(x, t)
    torch._dynamo.reset()
    want_grad = grad(loss(theirs))(x).float()
    want_jvp = jvp(loss(theirs), (x,), (v,))[1].float()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.compile(lambda x: grad(loss(ours))(x))(x), want_grad, **tol)
    torch.testing.assert_close(torch.compile(lambda x: jvp(loss(ours), (x,), (v,))[1])(x), want_jvp, **tol)
    xs = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.compile(lambda xs: vmap(grad(loss(ours)))(xs))(xs),
                               vmap(grad(loss(theirs)))(xs).float(), **tol)
    compiled = torch.compile(loss(ours))
    torch.testing.assert_close(grad(compiled)(x), want_grad, **tol)
    torch.testing.assert_close(jvp(compiled, (x,), (v,))[1], want_jvp, **tol)
