"""fastce.linear_cross_entropy against the naive path: F.linear, then cross-entropy (torch's,
or the float64 reference of fastce's options), on fresh random inputs."""
import re

import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce._ops import LossOptions
from fastce.linear import LinearCrossEntropyLoss, linear_cross_entropy
from reference import reference_cross_entropy

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")


def make(device, n=29, h=16, v=37, dtype=torch.float32, bias=False, spatial=()):
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, *spatial, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
    b = torch.randn(v, *spatial, device=device, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


def naive(x, w, t, b=None, **kw):
    """F.linear + cross-entropy in float64 (reference_cross_entropy covers fastce's options)."""
    v, spatial = w.shape[0], w.shape[1:-1]
    b64 = None if b is None else b.double().reshape(-1)
    logits = F.linear(x.double(), w.double().reshape(-1, w.shape[-1]), b64)
    logits = logits.reshape(*x.shape[:-1], v, *spatial)
    if x.dim() > 2:  # (*, H): rows are flattened, classes last
        logits, t = logits.reshape(-1, v), t.reshape(-1, *t.shape[x.dim() - 1:])
    weight = kw.pop("weight", None)
    loss = reference_cross_entropy(logits, t, weight=None if weight is None else weight.double(),
                                   **kw)
    if x.dim() > 2 and kw.get("reduction") == "none":
        loss = loss.reshape(x.shape[:-1])
    return loss


def check(x, w, t, b=None, rtol=1e-5, atol=1e-6, equal_nan=False, **kw):
    """Loss and every gradient equal the naive path's, for a random grad_output."""
    loss = linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    kw.pop("chunk_size", None)
    kw.pop("options", None)
    ref = naive(x, w, t, b, **kw)
    assert loss.shape == ref.shape and loss.dtype == x.dtype
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol, equal_nan=equal_nan)
    leaves = [p for p in (x, w, b) if p is not None and p.requires_grad]
    grad_out = torch.rand_like(ref) + 0.5
    grads = torch.autograd.grad(loss, leaves, grad_out.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    for g, r, p in zip(grads, ref_grads, leaves):
        assert g.dtype == p.dtype and g.shape == p.shape
        torch.testing.assert_close(g.double(), r.double(), rtol=rtol, atol=atol)


def class_targets(n, v, device, ignore_index=-100, shape=None):
    t = torch.randint(0, v, shape or (n,), device=device)
    t.view(-1)[::4] = ignore_index
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_matches_naive(device, reduction, bias, weighted, label_smoothing):
    x, w, b = make(device, bias=bias)
    t = class_targets(29, 37, device)
    weight = torch.rand(37, device=device) + 0.1 if weighted else None
    check(x, w, t, b, weight=weight, reduction=reduction, label_smoothing=label_smoothing,
          chunk_size=8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    dict(logit_scale=0.7),
    dict(softcap=3.0),
    dict(lse_square_scale=1e-2),
    dict(logit_scale=1.3, softcap=2.0, lse_square_scale=1e-3, label_smoothing=0.1),
])
def test_llm_options(device, reduction, options):
    x, w, b = make(device, bias=True)
    t = class_targets(29, 37, device, ignore_index=5)
    check(x, w, t, b, reduction=reduction, ignore_index=5, weight=torch.rand(37, device=device),
          chunk_size=10, **options)


@pytest.mark.parametrize("chunk_size", [1, 7, 29, 1000, None])
def test_chunk_sizes(device, chunk_size):
    x, w, b = make(device, bias=True)
    check(x, w, class_targets(29, 37, device), b, reduction="none", chunk_size=chunk_size)
    x, w, b = make(device, bias=True)
    check(x, w, class_targets(29, 37, device), b, reduction="mean", chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device, reduction):
    x, w, b = make(device, n=0, bias=True)
    check(x, w, torch.zeros(0, dtype=torch.long, device=device), b, reduction=reduction,
          equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_and_unbatched_inputs(device, reduction):
    x3 = torch.randn(3, 5, 16, device=device, requires_grad=True)  # (B, T, H)
    _, w, b = make(device, bias=True)
    check(x3, w, class_targets(15, 37, device, shape=(3, 5)), b, reduction=reduction,
          chunk_size=4)
    x1 = torch.randn(16, device=device, requires_grad=True)  # (H,)
    check(x1, w, torch.randint(0, 37, (), device=device), b, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k_dimensional_weight(device, reduction):
    x, w, b = make(device, bias=True, spatial=(3, 2))
    t = class_targets(29, 37, device, shape=(29, 3, 2))
    check(x, w, t, b, reduction=reduction, weight=torch.rand(37, device=device),
          label_smoothing=0.1, chunk_size=6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets(device, reduction):
    x, w, b = make(device, bias=True)
    y = torch.randn(29, 37, device=device).softmax(-1)
    check(x, w, y, b, reduction=reduction, label_smoothing=0.1, chunk_size=8,
          weight=torch.rand(37, device=device))


def test_partial_and_no_grads(device):
    x, w, b = make(device, bias=True)
    t = class_targets(29, 37, device)
    w.requires_grad_(False)  # a frozen head
    check(x, w, t, b, chunk_size=8)
    x.requires_grad_(False)
    b.requires_grad_(False)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=8)
    torch.testing.assert_close(loss.double(), naive(x, w, t, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes(device, dtype):
    x, w, b = make(device, dtype=dtype, bias=True)
    t = class_targets(29, 37, device)
    loose = dtype == torch.bfloat16
    check(x, w, t, b, reduction="sum", chunk_size=8, rtol=2e-2 if loose else 1e-10,
          atol=2e-2 if loose else 1e-10)


def test_bfloat16_weight_grad_accumulates_in_float32():
    # Many chunks each add a small contribution: bf16 accumulation would lose most of them.
    x = torch.randn(512, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 16, (512,))
    linear_cross_entropy(x, w, t, reduction="sum", chunk_size=1).backward()
    ref = torch.autograd.grad(naive(x, w, t, reduction="sum"), w)[0]
    err = (w.grad.double() - ref).abs().max() / ref.abs().max()
    assert err < 2 ** -7  # one bf16 rounding, not 512 of them


def test_second_backward_raises():
    x, w, _ = make("cpu")
    loss = linear_cross_entropy(x, w, class_targets(29, 37, "cpu"))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_probability_target_grad_is_refused():
    x, w, _ = make("cpu")
    y = torch.randn(29, 37).softmax(-1).requires_grad_()
    with pytest.raises(NotImplementedError, match="probability targets"):
        linear_cross_entropy(x, w, y)


_forward_op = torch.ops.fastce.linear_cross_entropy_forward.default
_backward_op = torch.ops.fastce.linear_cross_entropy_backward.default


def _options(reduction):
    return LossOptions(reduction, -100, 0.1, 1.2, 4.0, 1e-3)


def _op_args(device, reduction, grads, spatial=()):
    x, w, b = make(device, bias=True, spatial=spatial)
    t = class_targets(29, 37, device, shape=(29, *spatial))
    return (x, w, b, t, torch.rand(37, device=device), *_options(reduction), 8, *grads)


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("grads", [(True, True, True), (True, False, False)])
def test_opcheck_forward(device, reduction, grads):
    torch.library.opcheck(_forward_op, _op_args(device, reduction, grads))


def test_opcheck_k_dim_and_backward(device):
    torch.library.opcheck(_forward_op, _op_args(device, 1, (True, True, True), spatial=(2,)))
    x, w, b, t, weight, *_ = _op_args(device, 0, (True, True, True))
    loss, lse, *_ = _forward_op(x, w, b, t, weight, *_options(0), 8, False, False, False)
    args = (torch.rand_like(loss), x.detach(), w.detach(), b.detach(), t, weight, lse, *_options(0),
            8, True, True, True)
    torch.library.opcheck(_backward_op, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_dynamic(device, reduction):
    def f(x, w, b, t):
        return linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, softcap=5.0,
                                    lse_square_scale=1e-3, chunk_size=8)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)  # fullgraph: a break raises
    for n in (29, 19):  # a second size reuses the dynamic graph
        x, w, b = make(device, n=n, bias=True)
        t = class_targets(n, 37, device)
        loss = compiled(x, w, b, t)
        grad_out = torch.rand_like(loss)
        grads = torch.autograd.grad(loss, (x, w, b), grad_out)
        ref = f(x, w, b, t)
        ref_grads = torch.autograd.grad(ref, (x, w, b), grad_out)
        torch.testing.assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)


def _raises_like(expected_call, call):
    """`call` raises the exception type and message that `expected_call` raises."""
    with pytest.raises(Exception) as expected:
        expected_call()
    with pytest.raises(expected.type, match=re.escape(str(expected.value))):
        call()


def _linear_then_ce(x, w, t, b=None, **kw):
    return F.cross_entropy(F.linear(x, w, b), t, **kw)


@pytest.mark.parametrize("target", [
    torch.randint(0, 37, (30,)),        # batch size mismatch
    torch.randint(0, 37, (29, 2)),      # multi-target
    torch.tensor(3),                    # 0-D target for batched input
    torch.randint(0, 37, (29,)) + 37,   # out of bounds
    torch.randint(0, 37, (29,)).float(),  # wrong dtype
])
def test_target_errors_match_torch(target):
    x, w, _ = make("cpu")
    _raises_like(lambda: _linear_then_ce(x, w, target), lambda: linear_cross_entropy(x, w, target))


@pytest.mark.parametrize("kwargs", [
    dict(reduction="average"),
    dict(label_smoothing=1.5),
    dict(weight=torch.rand(5)),
])
def test_option_errors_match_torch(kwargs):
    x, w, _ = make("cpu")
    t = class_targets(29, 37, "cpu")
    _raises_like(lambda: _linear_then_ce(x, w, t, **kwargs),
                 lambda: linear_cross_entropy(x, w, t, **kwargs))


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("case", ["in_features", "bias", "weight_dim", "k_dim_unbatched",
                                  "k_dim_target"])
def test_linear_errors_match_torch(case):
    x, w, _ = make("cpu")
    t = class_targets(29, 37, "cpu")
    kw = {}
    if case == "in_features":
        w = torch.randn(37, 15)
    elif case == "bias":
        kw["linear_bias"] = torch.randn(36)
    elif case == "weight_dim":
        w = torch.randn(16)
    elif case == "k_dim_unbatched":
        x, w, t = torch.randn(16), torch.randn(37, 3, 16), torch.randint(0, 37, (3,))
    else:
        w, t = torch.randn(37, 3, 16), torch.randint(0, 37, (29, 2))
    _raises_like(lambda: F.linear_cross_entropy(x, w, t, **kw),
                 lambda: linear_cross_entropy(x, w, t, **kw))


def test_chunk_size_must_be_positive():
    x, w, _ = make("cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, class_targets(29, 37, "cpu"), chunk_size=0)


@pytest.mark.parametrize("out_features", [(), (2,)])
def test_module(device, out_features):
    torch.manual_seed(1)
    weight = torch.rand(11, device=device)
    mine = LinearCrossEntropyLoss(16, 11, out_features=out_features, bias=True, device=device,
                                  weight=weight, label_smoothing=0.1, chunk_size=4)
    x = torch.randn(9, 16, device=device, requires_grad=True)
    t = torch.randint(0, 11, (9, *out_features), device=device)
    loss = mine(x, t)
    loss.backward()
    v_h = (11, *out_features, 16)
    ref = naive(x, mine.linear.weight.reshape(v_h), t, mine.linear.bias.reshape(v_h[:-1]),
                weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(ref, (x, mine.linear.weight, mine.linear.bias))
    for g, r in zip((x.grad, mine.linear.weight.grad, mine.linear.bias.grad), ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-6)
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # same class, state and loss as torch's
        theirs = torch.nn.LinearCrossEntropyLoss(16, 11, out_features=out_features, bias=True,
                                                 device=device, weight=weight,
                                                 label_smoothing=0.1)
        assert isinstance(mine, torch.nn.LinearCrossEntropyLoss)
        theirs.load_state_dict(mine.state_dict())
        torch.testing.assert_close(loss, theirs(x, t))


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch has no LinearCrossEntropyOptions")
def test_accepts_torch_options(device):
    x, w, b = make(device, bias=True)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=5)
    check(x, w, class_targets(29, 37, device), b, options=options)


def test_module_checks_like_torch():
    with pytest.raises(RuntimeError, match=re.escape("expected weight shape to be (11,)")):
        LinearCrossEntropyLoss(16, 11, weight=torch.rand(10))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        LinearCrossEntropyLoss(16, 11, label_smoothing=2.0)

