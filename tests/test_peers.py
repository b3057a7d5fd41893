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


# ---- flash-attn's cross_entropy_loss -----------------------------------------------------------

def _flash_attn_reference(logits, labels, smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0,
                          ignore_index=-100, lse=None):
    """flash-attn's documented per-row loss in float64: with z = logit_scale * logits and L the
    row's lse (or the given one), (1 - s)(L - z_y) + s (L - mean_c z_c) + lse_square_scale L^2,
    and 0 on ignored rows; the z-loss part alone as the second value."""
    z = logits.double() * logit_scale
    L = torch.logsumexp(z, 1) if lse is None else lse.double()
    valid = labels != ignore_index
    z_y = z.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    ce = (1 - smoothing) * (L - z_y) + smoothing * (L - z.mean(1))
    zl = lse_square_scale * L * L
    return torch.where(valid, ce + zl, 0.0), torch.where(valid, zl, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1, logit_scale=0.8, lse_square_scale=1e-3),
                                  dict(ignore_index=4, lse_square_scale=1e-2)])
def test_flash_attn_cross_entropy_loss(dtype, opts):
    from fastce.compat import flash_attn_cross_entropy_loss
    torch.manual_seed(5)
    x = (torch.randn(33, 70, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 70, (33,))
    t[::4] = opts.get("ignore_index", -100)
    losses, z_losses = flash_attn_cross_entropy_loss(x, t, **opts)
    assert losses.dtype == z_losses.dtype == torch.float32 and losses.shape == (33,)
    assert not z_losses.requires_grad  # for logging, as flash-attn's
    ref_opts = dict(smoothing=opts.get("label_smoothing", 0.0), logit_scale=opts.get("logit_scale", 1.0),
                    lse_square_scale=opts.get("lse_square_scale", 0.0), ignore_index=opts.get("ignore_index", -100))
    xr = x.detach().double().requires_grad_()
    ref, ref_z = _flash_attn_reference(xr, t, **ref_opts)
    torch.testing.assert_close(losses.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_losses.double(), ref_z, rtol=1e-5, atol=1e-7)
    g = torch.rand(33, dtype=torch.float64)
    gx, = torch.autograd.grad((losses * g.float()).sum(), x)
    gr, = torch.autograd.grad((ref * g).sum(), xr)
    assert gx.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gx.double(), gr, rtol=tol, atol=tol * gr.abs().max().item())


def test_flash_attn_precomputed_lse_and_inplace_backward():
    from fastce.compat import flash_attn_cross_entropy_loss
    torch.manual_seed(6)
    x = torch.randn(12, 30, dtype=torch.float64)
    t = torch.randint(0, 30, (12,))
    t[3] = -100
    lse = torch.logsumexp(x, 1) + 0.25  # not the logits' own: flash-attn takes it as given
    leaf = x.clone().requires_grad_()
    losses, z = flash_attn_cross_entropy_loss(leaf, t, precomputed_lse=lse, lse_square_scale=1e-2)
    ref, ref_z = _flash_attn_reference(x, t, lse_square_scale=1e-2, lse=lse)
    torch.testing.assert_close(losses.double(), ref)
    torch.testing.assert_close(z.double(), ref_z)
    g = torch.rand(12, dtype=torch.float64)
    gx, = torch.autograd.grad((losses * g).sum(), leaf)
    # d/dx of L - x_y + s L^2 with L held fixed at the given lse: its softmax, exp(x - L)
    p = torch.exp(x - lse[:, None])
    want = g[:, None] * (p * (1 + 2e-2 * lse[:, None]) - F.one_hot(t.clamp(0), 30))
    want[3] = 0
    torch.testing.assert_close(gx, want)
    # ignored with label smoothing (as flash-attn): the lse is computed
    losses, _ = flash_attn_cross_entropy_loss(x, t, precomputed_lse=lse, label_smoothing=0.1)
    torch.testing.assert_close(losses.double(), _flash_attn_reference(x, t, smoothing=0.1)[0])
    # in-place backward: the gradient lands in the logits' storage
    h = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    head = torch.randn(5, 30, dtype=torch.float64)
    for plse in (None, torch.logsumexp((h @ head).detach(), 1)):
        logits = h @ head
        losses, _ = flash_attn_cross_entropy_loss(logits, t, precomputed_lse=plse, inplace_backward=True)
        gh, = torch.autograd.grad(losses.sum(), h)
        ref, _ = _flash_attn_reference(h @ head, t)
        ref_gh, = torch.autograd.grad(ref.sum(), h)
        torch.testing.assert_close(gh, ref_gh)


def _flash_attn_worker(rank, world, port, out_path):
    import datetime
    import json
    import os
    import torch.distributed as dist
    from fastce.compat import flash_attn_cross_entropy_loss
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    verdict = None
    try:
        torch.manual_seed(7)
        V_local = 13
        x = torch.randn(10, V_local * world, dtype=torch.float64)
        t = torch.randint(0, V_local * world, (10,))
        t[::3] = -100
        opts = dict(label_smoothing=0.1, logit_scale=0.9, lse_square_scale=1e-2)
        shard = x[:, rank * V_local:(rank + 1) * V_local].clone().requires_grad_()
        losses, z = flash_attn_cross_entropy_loss(shard, t, process_group=dist.group.WORLD, **opts)
        xr = x.clone().requires_grad_()
        ref, ref_z = _flash_attn_reference(xr, t, smoothing=0.1, logit_scale=0.9, lse_square_scale=1e-2)
        assert losses.dtype == torch.float32 and z.dtype == torch.float32
        assert torch.allclose(losses.double(), ref, rtol=1e-5, atol=1e-5), (losses, ref)
        assert torch.allclose(z.double(), ref_z, rtol=1e-5, atol=1e-7)
        g = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (losses.double() * g).sum().backward()
        (ref * g).sum().backward()
        assert torch.allclose(shard.grad, xr.grad[:, rank * V_local:(rank + 1) * V_local], rtol=1e-5, atol=1e-6)
    except Exception as e:  # reported by rank 0's file
        verdict = f"rank {rank}: {type(e).__name__}: {e}"
    gathered = [None] * world
    dist.all_gather_object(gathered, verdict)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([v for v in gathered if v], f)
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_flash_attn_process_group(world, tmp_path):
    import json
    from test_parallel import run_ranks
    out = tmp_path / "verdict.json"
    run_ranks(_flash_attn_worker, world, str(out))
    assert json.loads(out.read_text()) == []


# ---- Cut Cross-Entropy's shift, and loss_dtype, on linear_cross_entropy ------------------------

@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_shift_is_cut_cross_entropys(shift, reduction):
    torch.manual_seed(8)
    B, T, H, V = 3, 11, 8, 29
    h = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (B, T))
    t[0, 4] = -100
    loss = fastce.linear_cross_entropy(h, w, t, shift=shift, reduction=reduction, label_smoothing=0.1,
                                       lse_square_scale=1e-3, chunk_size=7)
    logits = (h @ w.t())[..., :-shift, :]
    tt = t[..., shift:]
    lse = torch.logsumexp(logits, -1)
    valid = tt != -100
    z = 1e-3 * torch.where(valid, lse * lse, 0.0)
    ref = F.cross_entropy(logits.reshape(-1, V), tt.reshape(-1), reduction=reduction, label_smoothing=0.1)
    if reduction == "none":
        ref = ref.reshape(B, T - shift) + z
    else:
        ref = ref + (z.sum() / valid.sum() if reduction == "mean" else z.sum())
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref)
    g = torch.rand_like(ref)
    got = torch.autograd.grad((loss * g).sum(), (h, w))
    want = torch.autograd.grad((ref * g).sum(), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.all(got[0][:, -shift:] == 0)  # the last positions predict nothing


def test_linear_shift_errors_and_zero():
    h, w, t = torch.randn(2, 5, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(fastce.linear_cross_entropy(h, w, t, shift=0), fastce.linear_cross_entropy(h, w, t))
    with pytest.raises(ValueError, match="shift"):
        fastce.linear_cross_entropy(h, w, t, shift=-1)
    with pytest.raises(ValueError, match="shift"):
        fastce.linear_cross_entropy(h, w, t[:, :4], shift=1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_loss_dtype_float32(reduction):
    torch.manual_seed(9)
    h = torch.randn(50, 16).bfloat16().requires_grad_()
    w = torch.randn(40, 16).bfloat16().requires_grad_()
    t = torch.randint(0, 40, (50,))
    loss = fastce.linear_cross_entropy(h, w, t, reduction=reduction, loss_dtype=torch.float32)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy((h @ w.t()).double(), t, reduction=reduction)  # the bf16 logits, in float64
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(loss.sum(), (h, w))
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert fastce.linear_cross_entropy(h, w, t, reduction=reduction).dtype == torch.bfloat16


def test_linear_module_shift_and_loss_dtype():
    torch.manual_seed(10)
    m = fastce.LinearCrossEntropyLoss(8, 19, shift=1, loss_dtype=torch.float32, dtype=torch.bfloat16)
    h = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    t = torch.randint(0, 19, (2, 6))
    loss = m(h, t)
    assert loss.dtype == torch.float32 and "shift=1" in repr(m)
    want = fastce.linear_cross_entropy(h, m.linear.weight, t, shift=1, loss_dtype=torch.float32)
    torch.testing.assert_close(loss, want)
