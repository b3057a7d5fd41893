"""LLM training options: logit_scale, softcap, z-loss, return_z_loss, inplace_backward."""
import itertools

import pytest
import torch

import fastce
from reference import reference_cross_entropy

TOL = {torch.float32: (3e-5, 3e-6), torch.float64: (1e-10, 1e-12), torch.bfloat16: (2e-2, 1e-2),
       torch.float16: (4e-3, 2e-3)}


def check(x, t, dtype, reduction, **opts):
    tol_loss, tol_grad = TOL[dtype]
    xa = x.detach().to(dtype).requires_grad_()
    xb = xa.detach().double().requires_grad_()
    loss, zl = fastce.cross_entropy(xa, t, reduction=reduction, return_z_loss=True, **opts)
    ref, ref_zl = reference_cross_entropy(xb, t, reduction=reduction, return_z_loss=True, **opts)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(loss.double(), ref, atol=tol_loss * scale, rtol=tol_loss, equal_nan=True)
    torch.testing.assert_close(zl.double(), ref_zl, atol=tol_loss * scale, rtol=tol_loss, equal_nan=True)
    # gradients of both outputs, with non-uniform incoming gradients
    g1, g2 = torch.rand_like(ref) + 0.5, torch.rand_like(ref_zl) + 0.5
    ga, = torch.autograd.grad((loss, zl), xa, (g1.to(loss.dtype), g2.to(zl.dtype)))
    gb, = torch.autograd.grad((ref, ref_zl), xb, (g1, g2))
    gscale = max(1.0, gb.abs().max().item())
    torch.testing.assert_close(ga.double(), gb, atol=tol_grad * gscale, rtol=tol_grad * 10)


OPTION_GRID = [dict(logit_scale=s, softcap=c, lse_square_scale=z)
               for s, c, z in itertools.product([1.0, 0.37], [None, 2.5, 30.0], [0.0, 1e-2])]


@pytest.mark.parametrize("opts", OPTION_GRID, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_options_against_float64_reference(device, opts, reduction):
    x = torch.randn(37, 301, device=device) * 4
    t = torch.randint(0, 301, (37,), device=device)
    t[::5] = -100
    w = torch.rand(301, device=device) + 0.2
    for dtype in [torch.float32, torch.float64]:
        check(x, t, dtype, reduction, **opts)
        check(x, t, dtype, reduction, weight=w.to(dtype), label_smoothing=0.1, **opts)
    y = torch.softmax(torch.randn(37, 301, device=device), 1)
    check(x, y, torch.float32, reduction, label_smoothing=0.05, **opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_options_low_precision(device, dtype):
    x = torch.randn(16, 1000, device=device) * 3
    t = torch.randint(0, 1000, (16,), device=device)
    check(x, t, dtype, "mean", logit_scale=0.5, softcap=15.0, lse_square_scale=1e-3, label_smoothing=0.1)


@pytest.mark.parametrize("shape", [(2, 4096, 32000), (3, 423, 32000)], ids=str)
def test_llm_shapes(shape):
    B, T, V = shape
    x = torch.randn(B * T, V) * 2
    t = torch.randint(0, V, (B * T,))
    t[::7] = -100
    check(x, t, torch.float32, "mean", softcap=30.0, lse_square_scale=1e-4, label_smoothing=0.1)


def test_k_dim_with_options(device):
    x = torch.randn(2, 50, 7, device=device)
    t = torch.randint(0, 50, (2, 7), device=device)
    check(x, t, torch.float32, "none", logit_scale=2.0, softcap=5.0, lse_square_scale=1e-2)


def test_z_loss_is_zero_without_scale(device):
    x = torch.randn(5, 9, device=device)
    t = torch.randint(0, 9, (5,), device=device)
    loss, zl = fastce.cross_entropy(x, t, return_z_loss=True)
    assert zl.item() == 0.0
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, t))


def lm_head_grads(inplace, dtype=torch.float32, **opts):
    torch.manual_seed(1)
    hidden = torch.randn(64, 32, dtype=dtype, requires_grad=True)
    W = torch.randn(32, 500, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 500, (64,))
    t[::9] = -100
    logits = hidden @ W
    loss = fastce.cross_entropy(logits, t, inplace_backward=inplace, **opts)
    loss.backward()
    return loss.detach(), hidden.grad, W.grad, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_through_lm_head(dtype):
    opts = dict(label_smoothing=0.1, softcap=20.0, lse_square_scale=1e-3)
    loss_a, gh_a, gw_a, logits_a = lm_head_grads(False, dtype, **opts)
    loss_b, gh_b, gw_b, logits_b = lm_head_grads(True, dtype, **opts)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(gh_a, gh_b) and torch.equal(gw_a, gw_b)
    # the logits' storage now holds their gradient (it was reused, not a new buffer)
    assert not torch.equal(logits_a.detach(), logits_b.detach())


def test_inplace_backward_detects_other_users_of_the_logits():
    hidden = torch.randn(8, 4, requires_grad=True)
    W = torch.randn(4, 10, requires_grad=True)
    logits = hidden @ W
    other = torch.sigmoid(logits)  # sigmoid saves its output, not logits: fine
    loss = fastce.cross_entropy(logits, torch.randint(0, 10, (8,)), inplace_backward=True)
    (loss + other.sum()).backward()  # does not need the logits' values after ours: allowed
    logits = hidden @ W
    squared = logits * logits  # saves the logits themselves for its backward
    loss = fastce.cross_entropy(logits, torch.randint(0, 10, (8,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squared.sum()).backward()


def test_inplace_backward_twice_is_detected():
    logits = torch.randn(8, 10, requires_grad=True) * 1
    loss = fastce.cross_entropy(logits, torch.randint(0, 10, (8,)), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_into_logits_whose_rows_share_memory_is_refused():
    # An expanded tensor has one row of storage for all rows: their gradients cannot all be
    # written there (torch's own error for writing into overlapping memory), never a silently
    # wrong gradient.
    h = torch.randn(1, 10, requires_grad=True)
    logits = (h * 1).expand(8, 10)
    loss = fastce.cross_entropy(logits, torch.arange(8), inplace_backward=True)
    with pytest.raises(RuntimeError, match="single memory location"):
        loss.backward()
    # Out of place, the same logits are fine.
    g, = torch.autograd.grad(fastce.cross_entropy((h * 1).expand(8, 10), torch.arange(8)), h)
    ref, = torch.autograd.grad(torch.nn.functional.cross_entropy((h * 1).expand(8, 10), torch.arange(8)), h)
    torch.testing.assert_close(g, ref)
