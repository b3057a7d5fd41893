"""fastce._C.forward_below_autograd / backward_below_autograd: the eager path's typed calls of the
ops must give what torch.ops gives (same bits, same errors), and record no autograd graph."""
import pytest
import torch

from fastce import _C
from test_ops_compile import cases

ops = torch.ops.fastce


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape and u.device == v.device
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("compute_grad", [False, True])
def test_forward_entry_is_the_op(device, compute_grad):
    for args in cases(device):
        got = _C.forward_below_autograd(*args, compute_grad, 0.75)
        _assert_same(got, _below_autograd(ops.cross_entropy_forward.default, *args, compute_grad, 0.75))
        assert not any(t.requires_grad for t in got)  # below autograd: no graph, whatever the input


@pytest.mark.parametrize("want_target_grad", [False, True])
def test_backward_entry_is_the_op(device, want_target_grad):
    for args in cases(device):
        x, t = args[0].detach(), args[1].detach()
        loss, zl, lse, tw, _ = ops.cross_entropy_forward(*args)
        bargs = (torch.rand_like(loss), torch.rand_like(zl), x, t, args[2], lse, tw, *args[3:9],
                 want_target_grad)
        got = _C.backward_below_autograd(*bargs)
        _assert_same(got, _below_autograd(ops.cross_entropy_backward.default, *bargs))


def test_backward_inplace_entry_is_the_op(device):
    for args in cases(device):
        x, t = args[0].detach(), args[1].detach()
        loss, zl, lse, tw, _ = ops.cross_entropy_forward(*args)
        bargs = (torch.rand_like(loss), torch.rand_like(zl), x, t, args[2], lse, tw, *args[3:9])
        by_entry, by_op = x.clone(), x.clone()
        assert _C.backward_inplace_below_autograd(*bargs[:2], by_entry, *bargs[3:]) is None
        _below_autograd(ops.cross_entropy_backward_inplace.default, *bargs[:2], by_op, *bargs[3:])
        _assert_same([by_entry], [by_op])
        assert not torch.equal(by_entry, x)  # it did write


def _error_of(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return type(info.value), str(info.value).split("\n")[0]


@pytest.mark.parametrize("fault", ["class out of range", "reduction", "softcap", "batch", "dtype"])
def test_entry_raises_what_the_op_raises(fault):
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    args = [x, t, None, 1, -100, 0.0, 1.0, None, 0.0, False, False, 1.0]
    if fault == "class out of range":
        args[1] = torch.tensor([0, 1, 7, 3])
    elif fault == "reduction":
        args[3] = 5
    elif fault == "softcap":
        args[7] = -1.0
    elif fault == "batch":
        args[1] = torch.tensor([0, 1])
    else:
        args[0] = x.to(torch.int32)
    expected = _error_of(_below_autograd, ops.cross_entropy_forward.default, *args)
    assert _error_of(_C.forward_below_autograd, *args) == expected


@pytest.mark.parametrize("position, value", [(0, [1.0]), (1, None), (2, 3), (3, 1.5), (5, "0.1"),
                                             (7, "cap"), (11, "half")])
def test_entry_rejects_wrong_argument_types(position, value):
    args = [torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), None, 1, -100, 0.0, 1.0, None, 0.0, False,
            False, 1.0]
    args[position] = value
    with pytest.raises(TypeError):
        _C.forward_below_autograd(*args)


@pytest.mark.parametrize("entry, count", [("forward_below_autograd", 12), ("backward_below_autograd", 14),
                                          ("backward_inplace_below_autograd", 13)])
def test_entry_checks_the_argument_count(entry, count):
    with pytest.raises(TypeError, match=f"takes {count} arguments, got 3"):
        getattr(_C, entry)(torch.randn(2, 3), torch.tensor([0, 1]), None)
