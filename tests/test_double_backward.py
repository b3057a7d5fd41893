"""Double backward: fastce's gradient is differentiable (create_graph=True), with torch's
second derivatives — through the logits, probability targets and the incoming gradient
(python/fastce/_ops.py: _LossGradient; python/fastce/_derivatives.py).
"""
import pytest
import torch
import torch.nn.functional as F

import fastce

CASES = {
    "index": dict(target=lambda g: torch.randint(0, 5, (4,), generator=g), kwargs={}),
    "index_all_options": dict(
        target=lambda g: torch.tensor([0, 4, -100, 2]),
        kwargs=dict(weight=torch.rand(5, dtype=torch.float64) + 0.5, label_smoothing=0.2, reduction="sum")),
    "prob": dict(target=lambda g: torch.rand(4, 5, generator=g, dtype=torch.float64), kwargs={}),
    "kdim": dict(target=lambda g: torch.randint(0, 5, (4, 3), generator=g), kwargs=dict(reduction="none")),
}


def inputs(case):
    gen = torch.Generator().manual_seed(0)
    shape = (4, 5, 3) if case == "kdim" else (4, 5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, CASES[case]["target"](gen), CASES[case]["kwargs"]


@pytest.mark.parametrize("case", CASES)
def test_first_order_exact_with_create_graph(case):
    x, target, kwargs = inputs(case)
    prob = target.is_floating_point()
    if prob:
        target.requires_grad_()
    wrt = (x, target) if prob else (x,)

    def grads(fn):
        loss = fn(x, target, **kwargs)
        return torch.autograd.grad(loss, wrt, torch.rand_like(loss, generator=torch.Generator().manual_seed(1)),
                                   create_graph=True)

    for ours, theirs in zip(grads(fastce.cross_entropy), grads(F.cross_entropy)):
        assert ours.requires_grad
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", CASES)
def test_gradgradcheck(case):
    x, target, kwargs = inputs(case)
    prob = target.is_floating_point()
    if prob:
        target.requires_grad_()
    args = (x, target) if prob else (x,)

    def fn(*a):
        return fastce.cross_entropy(a[0], a[1] if prob else target, **kwargs)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("case", CASES)
def test_second_derivatives_equal_torch(case):
    x, target, kwargs = inputs(case)
    prob = target.is_floating_point()
    wrt_target = target.clone().requires_grad_() if prob else target
    gen = torch.Generator().manual_seed(2)

    def second(fn):
        xr = x.detach().clone().requires_grad_()
        loss = fn(xr, wrt_target, **kwargs)
        grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1),
                              dtype=loss.dtype).requires_grad_()
        leaves = (xr, wrt_target) if prob else (xr,)
        grads = torch.autograd.grad(loss, leaves, grad_out, create_graph=True)
        v = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
        gen.manual_seed(2)
        return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, v)), (*leaves, grad_out))

    for ours, theirs in zip(second(fastce.cross_entropy), second(F.cross_entropy)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_hessian_equals_torch():
    x, target, _ = inputs("index")
    ours = torch.autograd.functional.hessian(lambda x: fastce.cross_entropy(x, target), x.detach())
    theirs = torch.autograd.functional.hessian(lambda x: F.cross_entropy(x, target), x.detach())
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_inplace_backward_double_backward():
    # create_graph=True: the gradient is a new tensor (the logits are not overwritten).
    x, target, _ = inputs("index")
    results = []
    for fn, kw in ((fastce.cross_entropy, dict(inplace_backward=True)), (F.cross_entropy, {})):
        xr = x.detach().clone().requires_grad_()
        g, = torch.autograd.grad(fn(xr * 1.0, target, **kw), xr, create_graph=True)
        results.append((g, torch.autograd.grad((g * g).sum(), xr)[0]))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_backward_op_gradgradcheck():
    """The registered autograd of fastce::cross_entropy_backward (direct op users)."""
    x, target, _ = inputs("index")
    loss, z_loss, lse, total_weight, _ = torch.ops.fastce.cross_entropy_forward(x.detach(), target, None)

    def backward(x, grad_loss):
        return torch.ops.fastce.cross_entropy_backward(grad_loss, torch.zeros_like(grad_loss), x, target, None,
                                                       lse, total_weight)[0]
    grad_loss = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    g = backward(xr, grad_loss)
    v = torch.randn_like(g)
    ours = torch.autograd.grad((g * v).sum(), (xr, grad_loss))
    xt = x.detach().clone().requires_grad_()
    gt, = torch.autograd.grad(F.cross_entropy(xt, target), xt, grad_loss, create_graph=True)
    theirs = torch.autograd.grad((gt * v).sum(), (xt, grad_loss))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
