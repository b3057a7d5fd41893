"""The ops' Python side: their options, fake kernels, and autograd.

The schemas and the CPU/CUDA kernels live in C++ (csrc/ops.cpp); importing ``fastce._C`` loads
them. Autograd is one formula (``_setup_context`` and ``_backward``) used two ways: registered
on the op with ``torch.library.register_autograd`` (for direct calls of ``torch.ops.fastce``),
and by ``_CrossEntropy``, the ``autograd.Function`` the public API applies (torch.library's
generic autograd wrapper costs ~30 us of Python per call, more than a 64x10 batch's step).
"""
import math
from typing import NamedTuple, Optional

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.fastce.*)
from ._errors import retyped

ops = torch.ops.fastce

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_NONE = 0


class LossOptions(NamedTuple):
    """The options every loss op takes after its tensors, in the schemas' order (csrc/ops.cpp)."""
    reduction: int = 1
    ignore_index: int = -100
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    lse_square_scale: float = 0.0
    class_offset: int = 0      # vocabulary-parallel: this slice's first class
    vocab_size: int = -1       # vocabulary-parallel: the whole vocabulary (-1: the input's)


def _row_shape(input):
    if input.dim() <= 1:
        return ()
    return (input.shape[0], *input.shape[2:])


def _acc_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _check_devices(input, *others):
    # The real kernels check this too; a meta tensor mixed with a real one dispatches here.
    for t in others:
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Tensor on device {input.device} is not on the expected device {t.device}!")


def _options_and(rest, kwargs, *extra):
    """LossOptions and the named trailing arguments of a call whose options start at rest[0]
    (the dispatcher passes every argument positionally, a user may name them)."""
    n = len(LossOptions._fields)
    options = LossOptions(*rest[:n])._replace(**{k: kwargs[k] for k in LossOptions._fields if k in kwargs})
    values = [kwargs.get(name, rest[n + i] if n + i < len(rest) else default)
              for i, (name, default) in enumerate(extra)]
    return options, values


@torch.library.register_fake("fastce::cross_entropy_forward")
def _forward_fake(input, target, weight, *rest, **kwargs):
    _check_devices(input, target, weight)
    opt, (compute_grad, loss_dtype) = _options_and(rest, kwargs, ("compute_grad", False), ("loss_dtype", None))
    rows = _row_shape(input)
    loss_shape = rows if opt.reduction == _NONE else ()
    loss_dtype = input.dtype if loss_dtype is None else loss_dtype
    return (input.new_empty(loss_shape, dtype=loss_dtype), input.new_empty(loss_shape, dtype=loss_dtype),
            input.new_empty(rows, dtype=torch.float64), input.new_empty((2,), dtype=_acc_dtype(input)),
            input.new_empty(input.shape if compute_grad else (0,)))


@torch.library.register_fake("fastce::cross_entropy_backward")
def _backward_fake(grad_loss, grad_z_loss, input, target, weight, lse, total_weight, *rest, **kwargs):
    _, (compute_grad_target,) = _options_and(rest, kwargs, ("compute_grad_target", False))
    grad_target_shape = input.shape if compute_grad_target and target.shape == input.shape else (0,)
    return input.new_empty(input.shape), input.new_empty(grad_target_shape)


@torch.library.register_fake("fastce::cross_entropy_backward_inplace")
def _backward_inplace_fake(*args, **kwargs):
    return None


# ---- calling the ops -------------------------------------------------------------------------

# The autograd registered with torch.library is a Python kernel at the Autograd key: it runs
# (and redispatches) on every call of the op, ~4 us, also where nothing needs a gradient.
# Where autograd has nothing to record (no input needs a gradient, or inside the Function
# that records the step), a plain eager call goes below it. torch has no public form of this
# guard; without it the calls take the Autograd key.
_BelowAutograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
# Under a torch.func transform the incoming gradient may be batched (no single value), and
# the transform's levels must see every call.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _plain_eager():
    return not torch.compiler.is_compiling() and not _functorch_active()


def call(op, *args, **kwargs):
    """op(*args, **kwargs) where autograd has nothing to record, with torch's exception types
    (fastce._errors)."""
    try:
        if _BelowAutograd is not None and _plain_eager():
            with _BelowAutograd():
                return op(*args, **kwargs)
        return op(*args, **kwargs)
    except RuntimeError as error:
        typed = retyped(error)
        if typed is None:
            raise
        raise typed from None


# ---- autograd --------------------------------------------------------------------------------

def _tracing(t):
    # Under torch.compile the backward graph is traced with fake/functional tensors; a
    # write into a saved input cannot be expressed there, so it is computed out of place.
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or torch._is_functional_tensor(t))


def _save(ctx, input, target, weight, options, lse, total_weight, inplace_backward=False):
    ctx.save_for_backward(input, target, weight, lse, total_weight)
    ctx.options = options
    ctx.inplace_backward = inplace_backward
    ctx.set_materialize_grads(False)  # _backward takes None for unused outputs: no zero tensors


def _setup_context(ctx, inputs, output):
    input, target, weight, *rest = inputs
    _, _, lse, total_weight, grad_input = output
    _save(ctx, input, target, weight, _options_and(rest, {})[0], lse, total_weight)
    ctx.mark_non_differentiable(lse, total_weight, grad_input)


def _backward(ctx, grad_loss, grad_z_loss, *_grads_of_non_differentiable_outputs):
    """The gradients of (input, target) for those of (loss, z_loss)."""
    if grad_loss is None and grad_z_loss is None:
        return None, None
    input, target, weight, lse, total_weight = ctx.saved_tensors
    if grad_z_loss is None:
        grad_z_loss = torch.zeros_like(grad_loss)
    if grad_loss is None:
        grad_loss = torch.zeros_like(grad_z_loss)
    # With create_graph=True the gradient must not be the logits tensor itself, and the
    # backward op must go through autograd (which refuses double backward).
    if ctx.inplace_backward and not torch.is_grad_enabled() and not _tracing(input):
        call(ops.cross_entropy_backward_inplace.default, grad_loss, grad_z_loss, input, target, weight, lse,
             total_weight, *ctx.options)
        # The logits now hold their gradient: make autograd reject any later use of them.
        torch.autograd.graph.increment_version(input)
        return input, None
    want_target_grad = ctx.needs_input_grad[1]
    args = (grad_loss, grad_z_loss, input, target, weight, lse, total_weight, *ctx.options, want_target_grad)
    if torch.is_grad_enabled():  # create_graph=True: through autograd, which refuses double backward
        grad_input, grad_target = ops.cross_entropy_backward.default(*args)
    else:
        grad_input, grad_target = call(ops.cross_entropy_backward.default, *args)
    return (grad_input if ctx.needs_input_grad[0] else None), (grad_target if want_target_grad else None)


def _registered_backward(ctx, grad_loss, grad_z_loss, *rest):
    return _backward(ctx, grad_loss, grad_z_loss) + (None,) * (len(ctx.needs_input_grad) - 2)


torch.library.register_autograd("fastce::cross_entropy_forward", _registered_backward,
                                setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastce.cross_entropy does not support double backward (create_graph=True through its "
        "gradient); use torch.nn.functional.cross_entropy for higher-order derivatives")


torch.library.register_autograd("fastce::cross_entropy_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---- the gradient in the forward pass --------------------------------------------------------
# On the CPU, a reduced loss whose logits need a gradient gets it in the forward pass, for a
# unit incoming gradient: each row is read from memory once instead of twice, and a step is
# one op call. The backward hands it over when the incoming gradient is 1, scales it in place
# otherwise (float32/float64: one more rounding), or recomputes it (16-bit logits, whose
# gradient would be rounded twice; a used z-loss; create_graph). Nothing is kept between calls.

def _saved_tensor_hooks_probe():
    # Checkpointing (non-reentrant) and offloading act through saved-tensor hooks; a gradient
    # held from the forward pass would escape them, so none is computed under them. torch
    # has no public query for them; without this one, none is computed at all.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return lambda: True
    try:
        top(False)
        return lambda: top(False) is not None
    except TypeError:  # a torch whose function takes no argument
        return lambda: top() is not None


_saved_tensor_hooks_active = _saved_tensor_hooks_probe()


def _gradient_in_forward(input, target, options, inplace_backward):
    return (options.reduction != _NONE and not inplace_backward and input.is_cpu
            and type(input) is torch.Tensor and not target.requires_grad and _plain_eager()
            and not _saved_tensor_hooks_active())


def _single_value(grad):
    """The incoming gradient's value, or None where it has none (a batched gradient of
    autograd.grad(is_grads_batched=True) or jacobian(vectorize=True))."""
    try:
        return grad.item()
    except RuntimeError:
        return None


def _scalable_in_place(dtype):
    return dtype in (torch.float32, torch.float64)


class _CrossEntropy(torch.autograd.Function):
    """loss, z_loss of the forward op, with the registered op's autograd formula."""

    @staticmethod
    def forward(input, target, weight, options, inplace_backward, compute_grad, loss_dtype=None):
        return call(ops.cross_entropy_forward.default, input, target, weight, *options, compute_grad, loss_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, options, inplace_backward, compute_grad, *_loss_dtype = inputs
        _, _, lse, total_weight, grad_input = output
        _save(ctx, input, target, weight, options, lse, total_weight, inplace_backward)
        ctx.grad_input = grad_input if compute_grad else None
        ctx.mark_non_differentiable(lse, total_weight, grad_input)

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss, *_):
        grad_input, ctx.grad_input = ctx.grad_input, None  # once: a second backward recomputes
        if grad_input is not None and grad_z_loss is None and grad_loss is not None \
                and not torch.is_grad_enabled():
            g = _single_value(grad_loss)
            if g == 1.0:
                return grad_input, None, None, None, None, None, None
            if g is not None and _scalable_in_place(grad_input.dtype) and math.isfinite(g):
                return grad_input.mul_(g), None, None, None, None, None, None
        del grad_input  # free it before the backward op allocates the recomputed one
        return _backward(ctx, grad_loss, grad_z_loss) + (None, None, None, None, None)


def _cheap_apply(function):
    """``function.apply`` without its Python wrapper while no torch.func transform is active.

    The wrapper binds default arguments through ``inspect.signature`` on every call (~15 us,
    half a 64x10 batch's forward+backward); its other work, routing torch.func transforms and
    unwrapping tensors that escaped one, is kept: a transform (and torch.compile) takes the
    public path, and escaped tensors are unwrapped as the wrapper does. A torch without these
    internals gets the public path always."""
    raw = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
    try:
        from torch._functorch.utils import unwrap_dead_wrappers
    except ImportError:
        raw = None
    if raw is None:
        return function.apply
    raw_apply = raw.__get__(None, function)

    def apply(*args):
        if not _plain_eager():  # (dynamo traces the public one)
            return function.apply(*args)
        return raw_apply(*unwrap_dead_wrappers(args))
    return apply


_apply_cross_entropy = _cheap_apply(_CrossEntropy)


def cross_entropy_loss(input, target, weight, options, inplace_backward=False, loss_dtype=None):
    """(loss, z_loss) of the forward op with these LossOptions, differentiable; of loss_dtype
    (None: the input's)."""
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    if not needs_grad:
        return call(ops.cross_entropy_forward.default, input, target, weight, *options, False, loss_dtype)[:2]
    compute_grad = input.requires_grad and _gradient_in_forward(input, target, options, inplace_backward)
    return _apply_cross_entropy(input, target, weight, options, inplace_backward, compute_grad, loss_dtype)[:2]


# ---- autocast --------------------------------------------------------------------------------
# Under torch.autocast, torch's cross_entropy runs in float32 (log_softmax and nll_loss are on
# autocast's float32 list) and returns a float32 loss. The loss op does the same without a
# float32 copy of 16-bit logits: its kernels accumulate in float32 already, so autocast only
# asks it for float32 results (loss_dtype). The gradient stays in the logits' dtype, as the
# gradient of torch's cast is. float64 logits are not cast by autocast, nor here.

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _autocast_kernel(device_type):
    def forward(input, target, weight, *rest, **kwargs):
        options, (compute_grad, loss_dtype) = _options_and(rest, kwargs, ("compute_grad", False),
                                                           ("loss_dtype", None))
        if loss_dtype is None and input.dtype in _LOW_PRECISION:
            loss_dtype = torch.float32
        with torch.autocast(device_type, enabled=False):
            return ops.cross_entropy_forward.default(input, target, weight, *options, compute_grad, loss_dtype)
    return forward


for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    torch.library.impl("fastce::cross_entropy_forward", _key)(_autocast_kernel(_device_type))
