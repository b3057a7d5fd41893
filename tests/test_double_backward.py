"""Double backward: fastce's gradient is not itself differentiable. The contract is that
first-order gradients stay exact under create_graph=True, and any attempt to
differentiate them raises a clear error (python/fastce/_ops.py) — never a silently wrong
second derivative.
"""
import pytest
import torch
import torch.nn.functional as F

import fastce

MESSAGE = "fastce.cross_entropy does not support double backward"

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
def test_gradgradcheck_raises_clear_error(case):
    x, target, kwargs = inputs(case)
    prob = target.is_floating_point()
    if prob:
        target.requires_grad_()
    args = (x, target) if prob else (x,)

    def fn(*a):
        return fastce.cross_entropy(a[0], a[1] if prob else target, **kwargs)

    # The same check passes for torch's implementation: the error is ours alone.
    assert torch.autograd.gradgradcheck(lambda *a: F.cross_entropy(a[0], a[1] if prob else target, **kwargs),
                                        args)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.gradgradcheck(fn, args)


def test_hessian_raises_clear_error():
    x, target, _ = inputs("index")
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.functional.hessian(lambda x: fastce.cross_entropy(x, target), x.detach())


def test_derivative_through_grad_output_raises():
    # d(grad_input)/d(grad_output) is a second-order path too.
    x, target, _ = inputs("index")
    loss = fastce.cross_entropy(x, target, reduction="none")
    grad_out = torch.rand(4, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(loss, x, grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        g.sum().backward()


def test_inplace_backward_double_backward_raises():
    x, target, _ = inputs("index")
    loss = fastce.cross_entropy(x * 1.0, target, inplace_backward=True)
    g, = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad(g.sum(), x)
