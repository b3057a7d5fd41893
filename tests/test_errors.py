"""Bad input raises what torch raises: same exception type, same message (the running torch's:
its wording and the order of its checks vary between versions)."""
import pytest
import torch
import torch.nn.functional as F

import fastce


def x(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


def idx(*shape, high=5, dtype=torch.long):
    return torch.randint(0, high, shape).to(dtype)


# (name, args, kwargs) — each call fails in torch.nn.functional.cross_entropy
TORCH_ERRORS = [
    ("float class target", (x(4, 5), idx(4).float()), {}),
    ("int16 target", (x(4, 5), idx(4, dtype=torch.int16)), {}),
    ("bool target", (x(4, 5), idx(4, high=2).bool()), {}),
    ("batch mismatch", (x(4, 5), idx(3)), {}),
    ("0-d target for batch", (x(3, 5), torch.tensor(1)), {}),
    ("2-d class target", (x(4, 5), idx(4, 1)), {}),
    ("1-d input, long 1-d target", (x(5), idx(3)), {}),
    ("1-d input, 2-d target", (x(5), idx(1, 1)), {}),
    ("k-dim target shape", (x(2, 5, 3), idx(2, 4)), {}),
    ("k-dim target rank", (x(2, 5, 3), idx(2)), {}),
    ("k-dim target extra dim", (x(2, 5, 3), idx(2, 3, 1)), {}),
    ("out of bounds", (x(4, 5), torch.tensor([0, 1, 7, 2])), {}),
    ("negative out of bounds", (x(4, 5), torch.tensor([0, 1, -3, 2])), {}),
    ("k-dim out of bounds", (x(2, 5, 3), torch.full((2, 3), 9)), {}),
    ("no classes", (x(3, 0), idx(3)), {}),
    ("weight size", (x(4, 5), idx(4)), {"weight": torch.ones(4)}),
    ("weight rank", (x(4, 5), idx(4)), {"weight": torch.ones(5, 1)}),
    ("weight dtype", (x(4, 5), idx(4)), {"weight": torch.ones(5, dtype=torch.float64)}),
    ("weight int", (x(4, 5), idx(4)), {"weight": torch.ones(5, dtype=torch.long)}),
    ("weight bf16", (x(4, 5), idx(4)), {"weight": torch.ones(5, dtype=torch.bfloat16)}),
    ("weight size, prob target", (x(3, 5), torch.rand(3, 5)), {"weight": torch.ones(4)}),
    ("label smoothing > 1", (x(4, 5), idx(4)), {"label_smoothing": 1.1}),
    ("label smoothing > 1, prob", (x(4, 5), torch.rand(4, 5)), {"label_smoothing": 2.0}),
    ("bad reduction", (x(4, 5), idx(4)), {"reduction": "avg"}),
    ("reduction None", (x(4, 5), idx(4)), {"reduction": None}),
    ("ignore_index with prob target", (x(4, 5), torch.rand(4, 5)), {"ignore_index": 1}),
    ("prob target shape", (x(4, 5), torch.rand(4, 6)), {}),
    ("long prob target", (x(5), idx(5)), {}),
    ("0-d input", (torch.tensor(1.0), torch.tensor(0)), {}),
    ("0-d prob input", (torch.tensor(1.0), torch.tensor(1.0)), {}),
    ("integer input", (idx(4, 5), idx(4)), {}),
    ("weight requires grad", (x(4, 5), idx(4)), {"weight": torch.ones(5, requires_grad=True)}),
]


@pytest.mark.parametrize("name,args,kwargs", TORCH_ERRORS, ids=[e[0] for e in TORCH_ERRORS])
def test_same_error_as_torch(name, args, kwargs):
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        fastce.cross_entropy(*args, **kwargs)
    assert ours.type is theirs.type, (ours.value, theirs.value)
    if name == "weight requires grad":
        assert "not differentiable with respect to argument 'weight'" in str(ours.value)
    else:
        assert str(ours.value).split("\n")[0] == str(theirs.value).split("\n")[0]


def test_negative_label_smoothing_is_rejected():
    # torch silently accepts a negative value; fastce enforces the documented range.
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0. Got: -0.1"):
        fastce.cross_entropy(x(4, 5), idx(4), label_smoothing=-0.1)


@pytest.mark.parametrize("kwargs,message", [
    ({"softcap": 0.0}, "softcap must be a positive finite number"),
    ({"softcap": -3.0}, "softcap must be a positive finite number"),
    ({"logit_scale": float("inf")}, "logit_scale must be finite"),
    ({"lse_square_scale": -1e-4}, "lse_square_scale must be a finite number >= 0"),
])
def test_bad_llm_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastce.cross_entropy(x(4, 5), idx(4), **kwargs)


def test_ops_reject_bad_arguments_directly():
    # The ops are usable without the Python front: they check everything themselves. Across
    # the stable ABI their errors are RuntimeErrors whose message names torch's type.
    with pytest.raises(RuntimeError, match=r"\[fastce:ValueError\] reduction must be"):
        torch.ops.fastce.cross_entropy_forward(x(2, 3), idx(2, high=3), None, 7)
    with pytest.raises(RuntimeError, match=r"\[fastce:IndexError\] Target 9 is out of bounds"):
        torch.ops.fastce.cross_entropy_forward(x(2, 3), torch.tensor([0, 9]), None, reduction=1)
    with pytest.raises(RuntimeError, match=r"\[fastce:ValueError\] class_offset \+ classes"):
        torch.ops.fastce.cross_entropy_forward(x(2, 3), idx(2, high=3), None, class_offset=2, vocab_size=4)
    with pytest.raises(RuntimeError, match="loss_dtype must be a floating point dtype"):
        torch.ops.fastce.cross_entropy_forward(x(2, 3), idx(2, high=3), None, loss_dtype=torch.int64)


def test_loss_options_match_the_schemas():
    # LossOptions (Python) is the options' one list; the C++ schemas must take the same, in order.
    from fastce._ops import LossOptions
    for op in (torch.ops.fastce.cross_entropy_forward, torch.ops.fastce.cross_entropy_backward,
               torch.ops.fastce.cross_entropy_backward_inplace):
        names = [a.name for a in op.default._schema.arguments]
        first = names.index("reduction")
        assert tuple(names[first:first + len(LossOptions._fields)]) == LossOptions._fields, op


def test_out_of_bounds_does_not_poison_later_calls():
    good_x, good_t = x(8, 5), idx(8)
    before = fastce.cross_entropy(good_x, good_t)
    for _ in range(3):
        with pytest.raises(IndexError, match="Target 5 is out of bounds."):
            fastce.cross_entropy(x(8, 5), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]))
    assert torch.equal(fastce.cross_entropy(good_x, good_t), before)


def test_inplace_backward_rejects_leaf():
    leaf = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True would overwrite a leaf"):
        fastce.cross_entropy(leaf, idx(4), inplace_backward=True)
