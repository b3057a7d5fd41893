"""The peers' semantics where fastce adopts them, from their documented definitions (float64
references written here, not taken from the peers' code)."""
import pytest
import torch
import torch.nn.functional as F

import fastce


def _liger_loss(x, t, w, s, reduction, ignore_index=-100, label_smoothing=0.0):
    """Liger-Kernel's cross-entropy with class weights and z-loss, in float64: torch's weighted
    cross-entropy (its 'mean' over the sum of the target weights) plus lse_square_scale * lse^2
    on every non-ignored row, not weighted, its 'mean' over the count of non-ignored rows."""
    x = x.double()
    ce = F.cross_entropy(x, t, weight=None if w is None else w.double(), ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(x, dim=1)
    valid = t != ignore_index
    z = s * torch.where(valid, lse * lse, 0.0)
    if reduction == "mean":
        z = z.sum() / valid.sum()
    elif reduction == "sum":
        z = z.sum()
    return ce + z, z


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_z_loss_with_class_weights_is_ligers(reduction, dtype):
    torch.manual_seed(0)
    N, C = 37, 23
    x = (torch.randn(N, C, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, C, (N,))
    t[::5] = -100
    w = torch.rand(C, dtype=dtype) * 2
    w[t[1]] = 0.0  # a counted row whose class weight is 0 still has a z-loss
    loss, z = fastce.cross_entropy(x, t, weight=w, reduction=reduction, lse_square_scale=1e-2,
                                   label_smoothing=0.1, return_z_loss=True)
    xr = x.detach().double().requires_grad_()
    ref, ref_z = _liger_loss(xr, t, w, 1e-2, reduction, label_smoothing=0.1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(z.double(), ref_z, **tol)
    g = torch.rand_like(ref)
    gz = torch.rand_like(ref_z)
    gx, = torch.autograd.grad((loss * g.to(dtype)).sum() + (z * gz.to(dtype)).sum(), x)
    gr, = torch.autograd.grad((ref * g).sum() + (ref_z * gz).sum(), xr)
    torch.testing.assert_close(gx.double(), gr, **tol)


def test_z_loss_with_class_weights_fused_linear():
    torch.manual_seed(1)
    N, H, C = 300, 16, 40
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(C, H, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, C, (N,))
    t[::7] = -100
    w = torch.rand(C, dtype=torch.float64) + 0.2
    for reduction in ("mean", "sum", "none"):
        loss = fastce.linear_cross_entropy(h, lw, t, weight=w, reduction=reduction, lse_square_scale=1e-2,
                                           chunk_size=64)
        ref, _ = _liger_loss(h @ lw.t(), t, w, 1e-2, reduction)
        torch.testing.assert_close(loss, ref)
        g = torch.rand_like(ref)
        got = torch.autograd.grad((loss * g).sum(), (h, lw))
        want = torch.autograd.grad((ref * g).sum(), (h, lw))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_z_loss_of_probability_targets_counts_every_row():
    # Probability targets have no ignored rows: the z-loss's mean is over all rows, as the
    # cross-entropy's, whatever the class weights.
    torch.manual_seed(2)
    x = torch.randn(9, 11, dtype=torch.float64)
    y = torch.softmax(torch.randn(9, 11, dtype=torch.float64), 1)
    w = torch.rand(11, dtype=torch.float64)
    loss, z = fastce.cross_entropy(x, y, weight=w, lse_square_scale=0.1, return_z_loss=True)
    lse = torch.logsumexp(x, 1)
    torch.testing.assert_close(z, 0.1 * (lse * lse).mean())
    torch.testing.assert_close(loss, F.cross_entropy(x, y, weight=w) + z)
