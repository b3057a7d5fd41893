"""Property-based tests: random problems, forward and backward against the float64 reference.

Hypothesis draws the structure of a problem (shapes, dtypes, layout, options, targets) and a
seed for the values; a failure shrinks to a small problem. CI runs a fixed (derandomized)
set of examples; for a deeper local run:

    FASTCE_FUZZ_EXAMPLES=5000 PYTHONPATH=python python -m pytest tests/test_fuzz.py
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastce
from reference import reference_cross_entropy

EXAMPLES = int(os.environ.get("FASTCE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FASTCE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Error allowed relative to the largest reference value: output rounding in the dtype
# plus float accumulation (double for float64).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@st.composite
def problems(draw, llm_options=True):
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["unbatched", "2d", "kdim"]))
    c = draw(st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 65, 257, 1000])))
    if layout == "unbatched":
        shape, class_dim = (c,), 0
    elif layout == "2d":
        shape, class_dim = (draw(st.integers(0, 6)), c), 1
    else:
        spatial = draw(st.lists(st.integers(0, 3), min_size=1, max_size=2))
        shape, class_dim = (draw(st.integers(0, 3)), c, *spatial), 1
    prob = draw(st.booleans())
    p = dict(dtype=dtype, shape=shape, class_dim=class_dim, prob=prob,
             strides=draw(st.sampled_from(["contiguous", "classes_last", "sliced"])),
             scale=draw(st.sampled_from([1.0, 4.0, 20.0])),
             seed=draw(st.integers(0, 2**31 - 1)),
             reduction=draw(st.sampled_from(["none", "mean", "sum"])),
             label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(0.0, 1.0)),
             weight=draw(st.booleans()),
             module=draw(st.booleans()))
    if prob:
        p["normalized"] = draw(st.booleans())
        p["target_grad"] = draw(st.booleans())
        p["ignore_index"] = draw(st.sampled_from([-100, -1]))
    else:
        p["target_dtype"] = draw(st.sampled_from([torch.long, torch.int32, torch.uint8]))
        p["ignore_index"] = draw(st.sampled_from([-100, -1, 0, c - 1, c + 3]))
        p["edge_classes"] = draw(st.booleans())
        p["ignored_fraction"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    if llm_options:
        p["logit_scale"] = draw(st.sampled_from([1.0, 1.0, 0.5, 1.7]))
        p["softcap"] = draw(st.sampled_from([None, None, 30.0, 2.5]))
        p["lse_square_scale"] = draw(st.sampled_from([0.0, 0.0, 1e-4, 0.1]))
    return p


def make_input(p, gen):
    """Logits with p's shape and dtype; maybe non-contiguous (classes last in memory, or
    every other element of a wider buffer)."""
    shape, dtype = p["shape"], p["dtype"]
    if p["strides"] == "classes_last" and len(shape) > 1:
        # allocate with the class dimension innermost, then move it into place
        perm_shape = [s for i, s in enumerate(shape) if i != p["class_dim"]] + [shape[p["class_dim"]]]
        x = (torch.randn(perm_shape, generator=gen) * p["scale"]).to(dtype)
        return x.movedim(-1, p["class_dim"])
    if p["strides"] == "sliced":
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * p["scale"]).to(dtype)
        return wide[..., ::2]
    return (torch.randn(shape, generator=gen) * p["scale"]).to(dtype)


def make_target(p, gen):
    shape, c = p["shape"], p["shape"][p["class_dim"]]
    if p["prob"]:
        y = torch.rand(shape, generator=gen, dtype=torch.float64)
        if p["normalized"] and y.numel():
            y = y / y.sum(p["class_dim"], keepdim=True)
        return y.to(p["dtype"])
    rows = tuple(s for i, s in enumerate(shape) if i != p["class_dim"])
    t = torch.randint(0, c, rows, generator=gen)
    if p["edge_classes"]:
        t = torch.where(torch.rand(rows, generator=gen) < 0.5, 0, c - 1)
    ignore = p["ignore_index"]
    representable = 0 <= ignore <= 255 or p["target_dtype"] != torch.uint8
    if representable:
        t = torch.where(torch.rand(rows, generator=gen) < p["ignored_fraction"], ignore, t)
    return t.to(p["target_dtype"])


def loss_and_grads(fn, x, target, grad_out, needs_target_grad):
    x = x.detach().clone().requires_grad_()
    target = target.detach().clone().requires_grad_(needs_target_grad)
    loss = fn(x, target)
    loss.backward(grad_out)
    return loss.detach(), x.grad, target.grad if needs_target_grad else None


def assert_close_to_reference(name, got, ref, dtype):
    assert got.dtype == dtype and got.shape == ref.shape, (name, got.dtype, got.shape, ref.shape)
    ref = ref.to(dtype).double()  # NaN and ±inf where the rounded answer has them
    got = got.double()
    scale = ref[ref.isfinite()].abs().max().item() if ref.isfinite().any() else 0.0
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL[dtype] * max(scale, 1.0), equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def check(p):
    gen = torch.Generator().manual_seed(p["seed"])
    dtype, c = p["dtype"], p["shape"][p["class_dim"]]
    x = make_input(p, gen)
    target = make_target(p, gen)
    # Weights away from 0: a zero total weight is its own test (tests/test_extreme.py).
    weight = (torch.rand(c, generator=gen) * 2 + 0.1).to(dtype) if p["weight"] else None
    opts = dict(weight=weight, ignore_index=p["ignore_index"], reduction=p["reduction"],
                label_smoothing=p["label_smoothing"])
    llm = {k: p[k] for k in ("logit_scale", "softcap", "lse_square_scale") if k in p}
    rows_shape = torch.Size(s for i, s in enumerate(p["shape"]) if i != p["class_dim"])
    grad_out = torch.rand(rows_shape, generator=gen).to(dtype) + 0.5 if p["reduction"] == "none" \
        else torch.tensor(1.7, dtype=dtype)
    target_grad = p["prob"] and p["target_grad"]

    if p["module"]:
        ours = fastce.CrossEntropyLoss(**opts, **llm)
    else:
        def ours(inp, tgt):
            return fastce.cross_entropy(inp, tgt, **opts, **llm)

    def reference(inp, tgt):
        tgt = tgt.double() if p["prob"] else tgt.long()
        w = None if weight is None else weight.double()
        return reference_cross_entropy(inp.double(), tgt, **{**opts, "weight": w}, **llm)

    got = loss_and_grads(ours, x, target, grad_out, target_grad)
    ref = loss_and_grads(reference, x, target, grad_out.double(), target_grad)
    for name, g, r in zip(("loss", "grad_input", "grad_target"), got, ref):
        if r is not None:
            assert_close_to_reference(name, g, r, dtype)


@FUZZ
@given(problems(llm_options=False))
def test_fuzz_torch_options(p):
    check(p)


@FUZZ
@given(problems(llm_options=True))
def test_fuzz_llm_options(p):
    check(p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", [(1, 1), (3, 17), (6, 300)])
def test_inplace_backward_matches_out_of_place(dtype, n, c):
    # Not a hypothesis test: while it fails, shrinking would cost half a minute.
    gen = torch.Generator().manual_seed(n * c)
    leaf = torch.randn(n, c, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, c, (n,), generator=gen)
    expected = torch.autograd.grad(fastce.cross_entropy(leaf, target, label_smoothing=0.1), leaf)[0]
    got = torch.autograd.grad(fastce.cross_entropy(leaf * 1, target, label_smoothing=0.1, inplace_backward=True),
                              leaf)[0]
    assert torch.equal(got, expected)
