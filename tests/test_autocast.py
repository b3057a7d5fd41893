"""Mixed precision: fastce under torch.autocast gives what torch's cross_entropy gives there (a
float32 loss, the gradient in the logits' dtype), and loss_dtype gives float32 results for
16-bit logits outside it."""
import pytest
import torch
import torch.nn.functional as F

import fastce


def _head(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(32, 50, dtype=dtype), torch.randn(24, 32, dtype=dtype), torch.randint(0, 50, (24,))


@pytest.mark.parametrize("kwargs", [{}, dict(label_smoothing=0.1, ignore_index=3), dict(reduction="none"),
                                    dict(weight=True), dict(reduction="sum", weight=True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_matches_torch(kwargs, dtype):
    kwargs = dict(kwargs)
    lin, h, t = _head()
    t[::5] = 3
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(50) + 0.5  # float32, as a module's buffer stays under autocast
    results, g = [], None
    for loss_fn in (F.cross_entropy, fastce.cross_entropy):
        lin.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            logits = lin(h)
            assert logits.dtype == dtype
            logits.retain_grad()
            loss = loss_fn(logits, t, **kwargs)
        assert loss.dtype == torch.float32
        g = torch.rand_like(loss) + 0.5 if g is None else g
        (loss * g).sum().backward()
        assert logits.grad.dtype == dtype
        results.append((loss.detach(), logits.grad, lin.weight.grad.clone()))
    (ref, ref_gx, ref_gw), (got, gx, gw) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # both from the same bf16 logits in float32
    # torch rounds the float32 gradient to the logits' dtype once, as fastce does: equal up to
    # that rounding
    tol = dict(rtol=1e-2, atol=1e-2 * ref_gx.abs().max().item()) if dtype == torch.bfloat16 else \
        dict(rtol=2e-3, atol=2e-3 * ref_gx.abs().max().item())
    torch.testing.assert_close(gx.float(), ref_gx.float(), **tol)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-2 * ref_gw.abs().max().item())


def test_autocast_z_loss_and_module():
    lin, h, t = _head(seed=1)
    crit = fastce.CrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(h)
        loss, z = crit(logits, t)
    assert loss.dtype == z.dtype == torch.float32
    x = logits.detach().double()
    lse = torch.logsumexp(x, 1)
    torch.testing.assert_close(z.double(), 1e-2 * (lse * lse).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), F.cross_entropy(x, t) + 1e-2 * (lse * lse).mean(), rtol=1e-5, atol=0)


def test_autocast_op_directly_and_float64_unchanged():
    x = torch.randn(6, 9, dtype=torch.bfloat16)
    t = torch.randint(0, 9, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, z = torch.ops.fastce.cross_entropy_forward(x, t, None)[:2]
        loss64 = fastce.cross_entropy(x.double(), t)
        loss16 = torch.ops.fastce.cross_entropy_forward(x, t, None, loss_dtype=torch.bfloat16)[0]
    assert loss.dtype == z.dtype == torch.float32 and loss64.dtype == torch.float64
    assert loss16.dtype == torch.bfloat16  # an explicit loss_dtype is kept
    torch.testing.assert_close(loss, F.cross_entropy(x.float(), t))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_dtype_float32(reduction, dtype):
    torch.manual_seed(3)
    x = (torch.randn(40, 300) * 4).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (40,))
    t[::6] = -100
    loss, z = fastce.cross_entropy(x, t, reduction=reduction, lse_square_scale=1e-3, label_smoothing=0.1,
                                   return_z_loss=True, loss_dtype=torch.float32)
    assert loss.dtype == z.dtype == torch.float32
    xr = x.detach().double()
    ref = F.cross_entropy(xr, t, reduction=reduction, label_smoothing=0.1)
    lse = torch.logsumexp(xr, 1)
    rz = 1e-3 * torch.where(t != -100, lse * lse, 0.0)
    rz = rz if reduction == "none" else rz.sum() / ((t != -100).sum() if reduction == "mean" else 1)
    torch.testing.assert_close(loss.double(), ref + rz, rtol=1e-5, atol=1e-6)  # float32, not 16-bit, precision
    torch.testing.assert_close(z.double(), rz, rtol=1e-5, atol=1e-7)
    gx, = torch.autograd.grad(loss.sum(), x)
    assert gx.dtype == dtype
    default = fastce.cross_entropy(x, t, reduction=reduction, lse_square_scale=1e-3, label_smoothing=0.1)
    assert default.dtype == dtype
    mod = fastce.CrossEntropyLoss(reduction=reduction, loss_dtype=torch.float32)
    assert mod(x, t).dtype == torch.float32 and "loss_dtype" in repr(mod)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_with_16_bit_logits(dtype):
    torch.manual_seed(4)
    x = (torch.randn(30, 17) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 17, (30,))
    w = torch.rand(17) + 0.25  # float32: kept in float32, not rounded to the logits' dtype
    for reduction in ("mean", "none"):
        loss = fastce.cross_entropy(x, t, weight=w, reduction=reduction, loss_dtype=torch.float32,
                                    label_smoothing=0.05)
        xr = x.detach().double().requires_grad_()
        ref = F.cross_entropy(xr, t, weight=w.double(), reduction=reduction, label_smoothing=0.05)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        gx, = torch.autograd.grad(loss.sum(), x)
        gr, = torch.autograd.grad(ref.sum(), xr)
        torch.testing.assert_close(gx.double(), gr.to(dtype).double(), rtol=1e-2, atol=1e-2 * gr.abs().max().item())
    # a float64 weight too; float32 logits keep torch's rule (the weight in the logits' dtype)
    fastce.cross_entropy(x, t, weight=w.double())
    with pytest.raises(RuntimeError, match="expected scalar type Float but found Double"):
        fastce.cross_entropy(x.detach().float(), t, weight=w.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_cuda_matches_torch():
    lin, h, t = _head(seed=5)
    lin, h, t = lin.cuda(), h.cuda(), t.cuda()
    out = []
    for loss_fn in (F.cross_entropy, fastce.cross_entropy):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = lin(h)
            logits.retain_grad()
            loss = loss_fn(logits, t, label_smoothing=0.1)
        loss.backward()
        out.append((loss.detach(), logits.grad))
    (ref, ref_g), (got, g) = out
    assert got.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), ref_g.float(), rtol=1e-2, atol=1e-2 * ref_g.abs().max().item())
