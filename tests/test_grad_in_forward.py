"""The gradient computed in the forward pass (cross_entropy_forward's compute_grad and
grad_scale, used by the eager path on the CPU): bit for bit what the backward op computes for
that incoming gradient, used only when the incoming gradient is exactly the one it was computed
for (the previous backward's), and recomputed (or rejected like torch) otherwise."""
import pytest
import torch

import fastce
from fastce import _ops
from reference import reference_cross_entropy

ops = torch.ops.fastce


@pytest.fixture(autouse=True)
def _fresh_expected_gradient():
    # The eager path remembers the incoming gradient of the last backward: start each test
    # from the initial state (1).
    _ops._ExpectedGradient.value = 1.0
    yield
    _ops._ExpectedGradient.value = 1.0

OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, weight=True, ignore=2),
    dict(logit_scale=0.7, softcap=5.0, lse_square_scale=1e-3, weight=True),
]


def _op_args(x, t, reduction, weight=False, ignore=-100, label_smoothing=0.0, logit_scale=1.0,
             softcap=None, lse_square_scale=0.0):
    C = x.shape[1] if x.dim() > 1 else x.shape[0]
    w = torch.rand(C, dtype=x.dtype, device=x.device) + 0.5 if weight else None
    return (x, t, w, reduction, ignore, label_smoothing, logit_scale, softcap, lse_square_scale, False)


def _backward_op(args, lse, total_weight, grad_scale=1.0):
    x, t, w, reduction = args[:4]
    shape = lse.shape if reduction == 0 else ()
    g = torch.full(shape, grad_scale, dtype=x.dtype, device=x.device)
    return ops.cross_entropy_backward(g, torch.zeros_like(g), x, t, w, lse, total_weight,
                                      *args[3:9], False)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 10), (5, 1), (9, 40000), (1, 70000), (3, 7, 4), (0, 5), (4, 0)], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("grad_scale", [1.0, -0.375], ids=str)  # (exact in every dtype)
def test_op_gradient_is_the_backward_ops_bit_for_bit(device, dtype, shape, options, grad_scale):
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
        fused = ops.cross_entropy_forward(*args, True, grad_scale)
        for a, b in zip(plain[:4], fused[:4]):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
        assert plain[4].numel() == 0 and fused[4].shape == x.shape
        expected = _backward_op(args, plain[2], plain[3], grad_scale)
        assert torch.equal(fused[4].nan_to_num(), expected.nan_to_num()), (reduction, (fused[4] - expected).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_gradient_with_probability_targets(device, dtype):
    x = torch.randn(12, 300, device=device).to(dtype)
    y = torch.softmax(torch.randn(12, 300, device=device), 1).to(dtype)
    for reduction in (1, 2):
        args = (x, y, None, reduction, -100, 0.2, 1.0, None, 1e-3, False)
        out = ops.cross_entropy_forward(*args, True, 0.5)
        assert torch.equal(out[4], _backward_op(args, out[2], out[3], 0.5))


def _count_backward_ops(monkeypatch):
    calls = []
    backward = _ops._backward
    monkeypatch.setattr(_ops, "_backward", lambda *a: calls.append(1) or backward(*a))
    return calls


def _registered(fn):
    # A torch function mode sends the call through torch.library's registered autograd, which
    # has no gradient in the forward pass: the reference for the eager path.
    class PassThrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with PassThrough():
        return fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(reduction="sum", label_smoothing=0.1),
                                     dict(lse_square_scale=1e-3, softcap=8.0)], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 3, 3.0])
def test_eager_backward_uses_it_for_the_expected_gradient(monkeypatch, dtype, options, scale):
    # A loop of (loss * scale).backward(): the first step's forward computed the gradient for
    # an incoming 1, so unless scale is 1 that step recomputes; from the second step on, the
    # forward computes it for `scale` and the backward hands it over.
    x = (torch.randn(33, 517) * 3).to(dtype)
    t = torch.randint(0, 517, (33,))
    calls = _count_backward_ops(monkeypatch)
    ref = x.double().requires_grad_()
    (reference_cross_entropy(ref, t, **options) * scale).backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    for step in range(3):
        grads = []
        for run in (lambda f: f(), _registered):
            h = x.clone().requires_grad_()
            run(lambda: (fastce.cross_entropy(h, t, **options) * scale).backward())
            grads.append(h.grad)
        # The registered path always runs the backward op (its own wrapper: not counted).
        assert len(calls) == (0 if scale == 1.0 else 1), step
        assert torch.equal(grads[0], grads[1])
        torch.testing.assert_close(grads[0].double(), ref.grad, rtol=tol, atol=tol * 1e-2)


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


def test_logits_modified_in_place_after_the_forward():
    # torch's gradient does not read the logits (log_softmax saves its output): changing them
    # after the forward pass does not change it. The gradient of the forward pass is the same;
    # a backward pass that must recompute (incoming gradient not 1) cannot, and says so.
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    grads = []
    for fn in (torch.nn.functional.cross_entropy, fastce.cross_entropy):
        h = x * 1.0
        loss = fn(h, t)
        with torch.no_grad():
            h.mul_(2)
        grads.append(torch.autograd.grad(loss, x)[0])
    torch.testing.assert_close(grads[0], grads[1])
    h = x * 1.0
    loss = fastce.cross_entropy(h, t)
    with torch.no_grad():
        h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss * 2).backward()


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


def test_the_expected_gradient_follows_the_loop(monkeypatch):
    x = torch.randn(16, 300, requires_grad=True)
    t = torch.randint(0, 300, (16,))
    calls = _count_backward_ops(monkeypatch)
    ref = x.detach().double().requires_grad_()
    reference_cross_entropy(ref, t).backward()

    def step(scale, z_loss=False):
        x.grad = None
        loss, z = fastce.cross_entropy(x, t, lse_square_scale=1e-3 * z_loss, return_z_loss=True)
        held = loss.grad_fn.grad_input is not None
        ((loss + z if z_loss else loss) * scale).backward()
        if not z_loss:
            torch.testing.assert_close(x.grad.double(), scale * ref.grad, rtol=1e-5, atol=1e-8)
        return held, len(calls)

    assert step(1.0) == (True, 0)
    assert step(0.25) == (True, 1)   # gradient accumulation: this step recomputes ...
    assert step(0.25) == (True, 1)   # ... the next ones get it from the forward pass
    assert step(1.0) == (True, 2)    # back to plain: one recomputation
    assert step(1.0) == (True, 2)
    assert step(1.0, z_loss=True) == (True, 3)  # the z-loss output used: nothing to expect ...
    assert step(1.0) == (False, 4)  # ... so the next forward computes none
    assert step(1.0) == (True, 4)
    assert step(0.0) == (True, 5)   # zero (or inf, NaN) is not expected either
    assert step(0.0) == (False, 6)


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
    # grad_loss, which has no single value to compare: the backward op recomputes.
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
