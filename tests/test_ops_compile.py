"""The registered ops: opcheck (schema, fake kernels, autograd registration) and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import fastce

ops = torch.ops.fastce


def forward_args(x, t, weight=None, reduction=1, ignore_index=-100, ls=0.0, scale=1.0, softcap=None, zscale=0.0):
    from fastce._ops import LossOptions
    return (x, t, weight, *LossOptions(reduction, ignore_index, ls, scale, softcap, zscale))


def cases(device):
    x = torch.randn(6, 11, device=device, requires_grad=True)
    t = torch.randint(0, 11, (6,), device=device)
    t[1] = -100
    w = torch.rand(11, device=device)
    y = torch.softmax(torch.randn(6, 11, device=device), 1).requires_grad_()
    k = torch.randn(2, 11, 3, device=device, requires_grad=True)
    kt = torch.randint(0, 11, (2, 3), device=device)
    return [
        forward_args(x, t),
        forward_args(x, t, w, reduction=0, ls=0.1),
        forward_args(x, t, w, reduction=2, scale=0.5, softcap=3.0, zscale=1e-3),
        forward_args(x.detach().double().requires_grad_(), t, w.double(), reduction=1, ls=0.2, zscale=1e-2),
        forward_args(y.detach().clone().requires_grad_(), y, reduction=0),
        forward_args(x, y, w, reduction=1, ls=0.1, softcap=5.0),
        forward_args(k, kt, reduction=0),
        forward_args(x.detach().bfloat16().requires_grad_(), t, reduction=1),
    ]


def test_opcheck_forward(device):
    for args in cases(device):
        torch.library.opcheck(ops.cross_entropy_forward, args)
        torch.library.opcheck(ops.cross_entropy_forward, args, {"compute_grad": True})
        torch.library.opcheck(ops.cross_entropy_forward, args, {"loss_dtype": torch.float64})


def test_opcheck_backward(device):
    for args in cases(device):
        x, t = args[0], args[1]
        loss, zl, lse, tw, _ = ops.cross_entropy_forward(*args)
        g = torch.rand_like(loss)
        bargs = (g, torch.rand_like(zl), x.detach(), t.detach(), args[2], lse, tw, *args[3:])
        torch.library.opcheck(ops.cross_entropy_backward, bargs, {"compute_grad_target": t.shape == x.shape})
        torch.library.opcheck(ops.cross_entropy_backward_inplace, (*bargs[:2], x.detach().clone(), *bargs[3:]))


def test_compile_fullgraph_dynamic_one_frame(device):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()

    def loss_fn(x, t, w):
        return fastce.cross_entropy(x, t, weight=w, label_smoothing=0.1, softcap=20.0, lse_square_scale=1e-4)

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    w = torch.rand(50, device=device)
    for n in [3, 8, 17, 64]:
        x = torch.randn(n, 50, device=device, requires_grad=True)
        t = torch.randint(0, 50, (n,), device=device)
        t[0] = -100
        loss = compiled(x, t, w)
        g, = torch.autograd.grad(loss, x)
        x2 = x.detach().requires_grad_()
        ref = loss_fn(x2, t, w)
        g2, = torch.autograd.grad(ref, x2)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(g, g2)
    # one graph for every batch size: no recompilation, no graph break
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compile_module_in_a_model(device):
    torch._dynamo.reset()
    model = torch.nn.Linear(16, 40).to(device)
    crit = fastce.CrossEntropyLoss(ignore_index=0, reduction="mean", label_smoothing=0.05)

    def step(h, t):
        return crit(model(h), t)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    h = torch.randn(12, 16, device=device)
    t = torch.randint(0, 40, (12,), device=device)
    loss = compiled(h, t)
    loss.backward()
    g_compiled = model.weight.grad.clone()
    model.weight.grad = None
    ref = F.cross_entropy(model(h), t, ignore_index=0, label_smoothing=0.05)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g_compiled, model.weight.grad)


def test_compile_inplace_backward_falls_back(device):
    torch._dynamo.reset()
    W = torch.randn(16, 40, device=device, requires_grad=True)

    def step(h, t):
        return fastce.cross_entropy(h @ W, t, inplace_backward=True, return_z_loss=True, lse_square_scale=1e-3)

    h = torch.randn(12, 16, device=device)
    t = torch.randint(0, 40, (12,), device=device)
    loss, zl = torch.compile(step, fullgraph=True)(h, t)
    gW, = torch.autograd.grad(loss, W)
    loss2, zl2 = step(h, t)
    gW2, = torch.autograd.grad(loss2, W)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(zl, zl2)
    torch.testing.assert_close(gW, gW2)


def test_compile_forward_op_with_compute_grad(device):
    # The op's gradient output traces (fake kernel, dynamic shapes) and equals the backward op's.
    torch._dynamo.reset()

    def fwd(x, t):
        loss, _, lse, tw, grad = ops.cross_entropy_forward(x, t, None, label_smoothing=0.1, compute_grad=True)
        return loss, lse, tw, grad

    compiled = torch.compile(fwd, fullgraph=True, dynamic=True)
    for n in [5, 9]:
        x = torch.randn(n, 30, device=device)
        t = torch.randint(0, 30, (n,), device=device)
        loss, lse, tw, grad = compiled(x, t)
        g = torch.ones((), device=device)
        expected = ops.cross_entropy_backward(g, torch.zeros_like(g), x, t, None, lse, tw, label_smoothing=0.1)[0]
        assert grad.shape == x.shape
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)
        torch.testing.assert_close(loss, F.cross_entropy(x, t, label_smoothing=0.1))


def test_compute_grad_must_be_a_bool():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises((TypeError, RuntimeError)):
        ops.cross_entropy_forward(x, t, None, compute_grad="yes")


def test_loss_dtype_must_be_a_dtype():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises((TypeError, RuntimeError)):
        ops.cross_entropy_forward(x, t, None, loss_dtype="half")


def test_compile_calls_the_backend_once():
    # Float options (label_smoothing, logit_scale, ...) must not make dynamo restart its
    # analysis and compile the function twice on its first call.
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()

    def loss_fn(x, t, w):
        return fastce.cross_entropy(x, t, weight=w, ignore_index=0, label_smoothing=0.05, logit_scale=0.9)

    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=True)
    x = torch.randn(8, 10, requires_grad=True)
    t, w = torch.randint(0, 10, (8,)), torch.rand(10)
    compiled(x, t, w).backward()
    compiled(torch.randn(5, 10, requires_grad=True), torch.randint(0, 10, (5,)), w).backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled(x, t, w), loss_fn(x, t, w))
