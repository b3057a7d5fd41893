"""The gradient computed in the forward pass (cross_entropy_forward's compute_grad, used by the
eager path on the CPU for 'mean'/'sum'): bit for bit what the backward op computes for a unit
incoming gradient; handed over when the incoming gradient is 1, scaled in place for other
values (float32/float64), recomputed otherwise. Nothing is kept between calls."""
import pytest
import torch

import fastce
from fastce import _ops
from fastce._ops import LossOptions
from reference import reference_cross_entropy

ops = torch.ops.fastce

OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, weight=True, ignore=2),
    dict(logit_scale=0.7, softcap=5.0, lse_square_scale=1e-3, weight=True),
]


def _op_args(x, t, reduction, weight=False, ignore=-100, label_smoothing=0.0, logit_scale=1.0,
             softcap=None, lse_square_scale=0.0):
    C = x.shape[1] if x.dim() > 1 else x.shape[0]
    w = torch.rand(C, dtype=x.dtype, device=x.device) + 0.5 if weight else None
    return (x, t, w, *LossOptions(reduction, ignore, label_smoothing, logit_scale, softcap, lse_square_scale))


def _backward_op(args, lse, total_weight):
    x, t, w, reduction = args[:4]
    shape = lse.shape if reduction == 0 else ()
    g = torch.ones(shape, dtype=x.dtype, device=x.device)
    return ops.cross_entropy_backward(g, torch.zeros_like(g), x, t, w, lse, total_weight, *args[3:])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 10), (5, 1), (9, 40000), (1, 70000), (3, 7, 4), (0, 5), (4, 0)], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_op_gradient_is_the_backward_ops_bit_for_bit(device, dtype, shape, options):
    # 40000 and 70000 classes: rows of two and three pieces, many rows (one task per row) and
    # one row (split across threads, its gradient after the merge).
    x = (torch.randn(shape, device=device) * 4).to(dtype)
    C = shape[1]
    t = torch.randint(0, max(C, 1), (shape[0], *shape[2:]), device=device)
    if t.numel() > 1:
        t.view(-1)[1] = options.get("ignore", -100)
    for reduction in (0, 1, 2):
        args = _op_args(x, t, reduction, **options)
        if C == 0 and t.numel() > 0:
            args = args[:1] + (t.fill_(options.get("ignore", -100)),) + args[2:]
        plain = ops.cross_entropy_forward(*args)
        fused = ops.cross_entropy_forward(*args, compute_grad=True)
        for a, b in zip(plain[:4], fused[:4]):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
        assert plain[4].numel() == 0 and fused[4].shape == x.shape
        expected = _backward_op(args, plain[2], plain[3])
        assert torch.equal(fused[4].nan_to_num(), expected.nan_to_num()), (reduction, (fused[4] - expected).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_gradient_with_probability_targets(device, dtype):
    x = torch.randn(12, 300, device=device).to(dtype)
    y = torch.softmax(torch.randn(12, 300, device=device), 1).to(dtype)
    for reduction in (1, 2):
        args = (x, y, None, *LossOptions(reduction, -100, 0.2, 1.0, None, 1e-3))
        out = ops.cross_entropy_forward(*args, compute_grad=True)
        assert torch.equal(out[4], _backward_op(args, out[2], out[3]))


def _count_backward_ops(monkeypatch):
    calls = []
    backward = _ops._backward
    monkeypatch.setattr(_ops, "_backward", lambda *a: calls.append(1) or backward(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(reduction="sum", label_smoothing=0.1),
                                     dict(lse_square_scale=1e-3, softcap=8.0)], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3, 3.0])
def test_backward_hands_over_scales_or_recomputes(monkeypatch, dtype, options, scale):
    # (loss * scale).backward(): scale 1 takes the forward's gradient as it is; another
    # scale multiplies it in place (float32/float64: within an ulp of the backward op's) or,
    # for 16-bit logits whose gradient would be rounded twice, recomputes it exactly.
    x = (torch.randn(33, 517) * 3).to(dtype)
    t = torch.randint(0, 517, (33,))
    calls = _count_backward_ops(monkeypatch)
    reduction = _ops.REDUCTIONS[options.get("reduction", "mean")]
    opts = LossOptions(reduction, -100, options.get("label_smoothing", 0.0), 1.0, options.get("softcap"),
                       options.get("lse_square_scale", 0.0))
    h = x.clone().requires_grad_()
    (fastce.cross_entropy(h, t, **options) * scale).backward()
    recomputed = scale != 1.0 and dtype == torch.bfloat16
    assert len(calls) == int(recomputed)
    op_h = x.clone().requires_grad_()
    (ops.cross_entropy_forward(op_h, t, None, *opts)[0] * scale).backward()  # the backward op's gradient
    if scale == 1.0 or recomputed:
        assert torch.equal(h.grad, op_h.grad)
    else:
        # the same per-element float arithmetic, scaled after instead of before: within a
        # few roundings of the largest element
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(h.grad, op_h.grad, rtol=2 * eps, atol=4 * eps * op_h.grad.abs().max().item())
    ref = x.double().requires_grad_()
    (reference_cross_entropy(ref, t, **options) * scale).backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(h.grad.double(), ref.grad, rtol=tol, atol=tol * 1e-2)


def test_z_loss_gradient_recomputes(monkeypatch):
    x = torch.randn(16, 100, requires_grad=True)
    t = torch.randint(0, 100, (16,))
    calls = _count_backward_ops(monkeypatch)
    loss, z = fastce.cross_entropy(x, t, lse_square_scale=1e-2, return_z_loss=True)
    (loss + 10 * z).backward()
    assert len(calls) == 1
    ref = x.detach().double().requires_grad_()
    rl, rz = reference_cross_entropy(ref, t, lse_square_scale=1e-2, return_z_loss=True)
    (rl + 10 * rz).backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-6, atol=1e-8)


def test_second_backward_recomputes_and_accumulates(monkeypatch):
    x = torch.randn(8, 50, requires_grad=True)
    t = torch.randint(0, 50, (8,))
    calls = _count_backward_ops(monkeypatch)
    loss = fastce.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    assert len(calls) == 1  # the forward's gradient is used once; the second pass recomputes
    assert torch.equal(x.grad, 2 * once)
    g, = torch.autograd.grad(fastce.cross_entropy(x, t), x)
    assert torch.equal(g, once)


def test_no_state_between_calls(monkeypatch):
    # What one call's backward got changes nothing in the next call.
    x = torch.randn(16, 300, requires_grad=True)
    t = torch.randint(0, 300, (16,))
    calls = _count_backward_ops(monkeypatch)
    for scale, z_loss in [(0.25, False), (1.0, True), (0.0, False), (1.0, False)]:
        x.grad = None
        loss, z = fastce.cross_entropy(x, t, lse_square_scale=1e-3, return_z_loss=True)
        assert loss.grad_fn.grad_input is not None  # every forward computes it
        ((loss + z if z_loss else loss) * scale).backward()
    assert len(calls) == 1  # only the used z-loss recomputed


def test_logits_modified_in_place_after_the_forward():
    # torch's gradient does not read the logits (log_softmax saves its output): changing them
    # after the forward pass does not change it. The gradient of the forward pass is the same;
    # a backward pass that must recompute (z-loss used) cannot, and says so.
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    grads = []
    for fn in (torch.nn.functional.cross_entropy, fastce.cross_entropy):
        h = x * 1.0
        loss = fn(h, t)
        with torch.no_grad():
            h.mul_(2)
        grads.append(torch.autograd.grad(loss * 2, x)[0])
    torch.testing.assert_close(grads[0], grads[1])
    h = x * 1.0
    loss, z = fastce.cross_entropy(h, t, lse_square_scale=1e-3, return_z_loss=True)
    with torch.no_grad():
        h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + z).backward()


@pytest.mark.parametrize("case", ["inplace_backward", "reduction_none", "probability_target_grad", "plain"])
def test_not_used_where_it_cannot_help(monkeypatch, case):
    # inplace_backward keeps the logits intact until the backward pass, 'none' has per-row
    # gradients, and probability targets that need their own gradient take the backward op.
    x = torch.randn(5, 7)
    target = torch.randint(0, 7, (5,))
    kwargs = {}
    if case == "inplace_backward":
        kwargs["inplace_backward"] = True
    elif case == "reduction_none":
        kwargs["reduction"] = "none"
    elif case == "probability_target_grad":
        target = torch.softmax(torch.randn(5, 7), 1).requires_grad_()
    calls = _count_backward_ops(monkeypatch)
    h = x.clone().requires_grad_()
    fastce.cross_entropy(h * 1.0, target, **kwargs).sum().backward()
    assert len(calls) == (0 if case == "plain" else 1)
    ref = x.double().requires_grad_()
    reference_cross_entropy(ref, target.detach() if target.is_floating_point() else target,
                            reduction=kwargs.get("reduction", "mean")).sum().backward()
    torch.testing.assert_close(h.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_bits_for_every_thread_count(dtype):
    # 6 rows of 3 pieces: one thread takes a task per row (gradient in the same pass), two
    # threads split the pieces (gradient after the merge). The bits must not change.
    x = (torch.randn(6, 70000) * 3).to(dtype)
    t = torch.randint(0, 70000, (6,))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            h = x.clone().requires_grad_()
            loss = fastce.cross_entropy(h, t, label_smoothing=0.1, lse_square_scale=1e-3)
            loss.backward()
            results.append((loss.detach(), h.grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def _holds_gradient(loss):
    return loss.grad_fn.grad_input is not None


def test_not_held_under_checkpointing_or_saved_tensor_hooks():
    # A gradient held from the forward pass would escape what checkpointing and offloading
    # do through saved-tensor hooks.
    from torch.utils.checkpoint import checkpoint
    h = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(16, 200, requires_grad=True)
    t = torch.randint(0, 200, (32,))
    held = []

    def step(h):
        loss = fastce.cross_entropy(h @ w, t)
        held.append(_holds_gradient(loss))
        return loss
    checkpoint(step, h, use_reentrant=False).backward()
    with torch.autograd.graph.save_on_cpu():
        step(h)
    # the checkpointed forward and the one under save_on_cpu (the checkpoint's recomputation
    # may stop before the loss once it has what backward needs)
    assert len(held) >= 2 and not any(held)
    ref_h, ref_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference_cross_entropy(ref_h @ ref_w, t).backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-7)


def test_batched_incoming_gradients():
    # autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) send a batched
    # grad_loss, which has no single value: the backward op recomputes.
    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    v = torch.tensor([1.0, 2.0, -0.5])
    got, = torch.autograd.grad(fastce.cross_entropy(x, t), x, v, is_grads_batched=True)
    ref, = torch.autograd.grad(torch.nn.functional.cross_entropy(x, t), x, v, is_grads_batched=True)
    torch.testing.assert_close(got, ref)
    jac = torch.autograd.functional.jacobian(lambda z: fastce.cross_entropy(z, t, reduction="sum"), x,
                                             vectorize=True)
    ref_jac = torch.autograd.functional.jacobian(
        lambda z: torch.nn.functional.cross_entropy(z, t, reduction="sum"), x, vectorize=True)
    torch.testing.assert_close(jac, ref_jac)
