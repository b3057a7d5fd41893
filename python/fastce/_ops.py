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
from ._derivatives import hessian_product
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
    # A slice of the vocabulary gives the merge (max, log-sum, weight of the lse) per row (csrc/rules.h: SliceLse).
    lse_shape = (*rows, 3) if opt.vocab_size >= 0 else rows
    return (input.new_empty(loss_shape, dtype=loss_dtype), input.new_empty(loss_shape, dtype=loss_dtype),
            input.new_empty(lse_shape, dtype=torch.float64), input.new_empty((2,), dtype=_acc_dtype(input)),
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


_forward_ad = torch.autograd.forward_ad


def _dual_level_active():
    """Inside torch.autograd.forward_ad.dual_level(): a dual tensor may reach the ops.
    (forward_ad keeps the level in a module global; torch has no public query.)"""
    return getattr(_forward_ad, "_current_level", -1) >= 0


def _transforms_active():
    """A torch.func transform or forward-mode AD may see the call (dynamo evaluates both
    while tracing a transform inside a compiled function)."""
    return _functorch_active() or _dual_level_active()


def call(op, *args, **kwargs):
    """op(*args, **kwargs) where autograd has nothing to record, with torch's exception types
    (fastce._errors)."""
    if _BelowAutograd is not None and _plain_eager():
        return call_below_autograd(op, *args, **kwargs)
    try:
        return op(*args, **kwargs)
    except RuntimeError as error:
        raise _typed(error) from None


def call_below_autograd(op, *args, **kwargs):
    """call() where the caller knows it runs in plain eager mode (see _plain_eager)."""
    try:
        with _BelowAutograd():
            return op(*args, **kwargs)
    except RuntimeError as error:
        raise _typed(error) from None


def _typed(error):
    """The error with torch's exception type (fastce._errors), else itself."""
    typed = retyped(error)
    return error if typed is None else typed


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
    # With create_graph=True (or under a transform) the gradient must not be the logits
    # tensor itself, and the backward op must be differentiable (_LossGradient).
    second_order = torch.is_grad_enabled() or _transforms_active()
    if ctx.inplace_backward and not second_order and not _tracing(input):
        call(ops.cross_entropy_backward_inplace.default, grad_loss, grad_z_loss, input, target, weight, lse,
             total_weight, *ctx.options)
        # The logits now hold their gradient: make autograd reject any later use of them.
        torch.autograd.graph.increment_version(input)
        return input, None
    want_target_grad = ctx.needs_input_grad[1]
    args = (grad_loss, grad_z_loss, input, target, weight, lse, total_weight, *ctx.options, want_target_grad)
    if second_order:
        grad_input, grad_target = _LossGradient.apply(grad_loss, grad_z_loss, input, target, weight, lse,
                                                      total_weight, _Static((ctx.options, want_target_grad)))
    else:
        grad_input, grad_target = call(ops.cross_entropy_backward.default, *args)
    return (grad_input if ctx.needs_input_grad[0] else None), (grad_target if want_target_grad else None)


def _registered_backward(ctx, grad_loss, grad_z_loss, *rest):
    return _backward(ctx, grad_loss, grad_z_loss) + (None,) * (len(ctx.needs_input_grad) - 2)


torch.library.register_autograd("fastce::cross_entropy_forward", _registered_backward,
                                setup_context=_setup_context)


# ---- derivatives of the gradient and forward mode ---------------------------------------------
# Only double backward (create_graph=True), torch.func transforms and forward-mode AD reach
# this section; the first-order eager path above never does. The gradient op is linear in
# the incoming gradients, so its derivative in them is the op again, and its derivative in
# (input, target) is the loss's Hessian (python/fastce/_derivatives.py, symmetric: one
# product serves double backward and forward mode). The loss's own forward-mode tangent is
# sum(gradient * tangent), the gradient from the op for unit incoming gradients, a chunk of
# rows at a time (_directional).

class _Static:
    """Non-tensor arguments of a Function under torch.func, held as one leaf: functorch's
    generated rules pair inputs with tangents after flattening them as pytrees, and would
    flatten a LossOptions into eight."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _class_dim_sum(t, input, reduced):
    """The per-row (or, reduced, total) sums of an (input-shaped) product."""
    if reduced:
        return t.sum()
    return t.sum(dim=1 if input.dim() > 1 else 0)


# Logits per chunk of _directional: bounds the gradient it holds (a forward-mode tangent
# of the loss takes no (N, C) intermediate beyond one chunk).
_DIRECTIONAL_CHUNK_ELEMENTS = 1 << 22


def _directional(grad_loss, grad_z_loss, input, target, weight, lse, total_weight, options, x_dir, y_dir):
    """d/dgrad_loss of <gradient(grad_loss, grad_z_loss), (x_dir, y_dir)>, of grad_loss's
    shape: the gradient for unit incoming gradients of the given kind, summed against the
    directions (the gradient op is linear in grad_loss and grad_z_loss), over chunks of
    rows (dim 0; the op takes the whole problem's total_weight)."""
    rows = input.shape[0] if input.dim() > 1 else 1
    chunk = max(1, _DIRECTIONAL_CHUNK_ELEMENTS // max(1, input.numel() // max(rows, 1)))
    if rows <= chunk:
        return _directional_chunk(grad_loss, grad_z_loss, input, target, weight, lse, total_weight, options,
                                  x_dir, y_dir)
    reduced = options.reduction != _NONE
    parts = []
    for start in range(0, rows, chunk):
        def cut(t, rows_of=slice(start, start + chunk)):
            return t if t is None else t[rows_of]
        parts.append(_directional_chunk(
            grad_loss if reduced else cut(grad_loss), grad_z_loss if reduced else cut(grad_z_loss), cut(input),
            cut(target), weight, cut(lse), total_weight, options, cut(x_dir), cut(y_dir)))
    return sum(parts[1:], parts[0]) if reduced else torch.cat(parts)


def _directional_chunk(grad_loss, grad_z_loss, input, target, weight, lse, total_weight, options, x_dir, y_dir):
    want_y = y_dir is not None and target.is_floating_point()
    gx, gy = _LossGradient.apply(grad_loss, grad_z_loss, input, target, weight, lse, total_weight,
                                 _Static((options, want_y)))
    reduced = options.reduction != _NONE
    acc = _acc_dtype(input)  # (16-bit logits: the products summed in float32)
    total = None
    if x_dir is not None:
        total = _class_dim_sum(gx.to(acc) * x_dir.to(acc), input, reduced)
    if want_y:
        by_y = _class_dim_sum(gy.to(acc) * y_dir.to(acc), input, reduced)
        total = by_y if total is None else total + by_y
    return total


def _unit(t):
    return torch.ones_like(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _zero(t):
    return torch.zeros_like(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _forward_mode_levels():
    """How many forward-mode levels see this call: torch.func.jvp levels (jacfwd included;
    each runs inside a forward_ad.dual_level), or the eager dual level alone. torch has no
    public query for the transform stack."""
    try:
        from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters
        jvp_levels = sum(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    except ImportError:
        jvp_levels = 0
    return max(jvp_levels, int(_dual_level_active()))


def _refuse_nested_forward_mode():
    # A Function's jvp runs with forward-mode AD off for every level: an outer forward level
    # would get no tangent from the computation inside it, a silently wrong derivative.
    if _forward_mode_levels() > 1:
        raise NotImplementedError(
            "fastce.cross_entropy: forward-mode AD over forward-mode AD (torch.func.jacfwd(jacfwd(f)), "
            "nested torch.func.jvp) is not supported; "
            "for second derivatives use torch.func.hessian (jacfwd over jacrev), jacrev over jacfwd, "
            "jvp over grad, or double backward")


def _no_weight_derivative(weight_tangent):
    if weight_tangent is not None:
        raise RuntimeError(
            "The function 'cross_entropy' is not differentiable with respect to argument 'weight'. "
            "This input cannot have a forward-mode tangent.")


def _loss_jvp(saved, options, loss_like, input_t, target_t):
    """The tangents of (loss, z_loss) for those of input and target (either may be None)."""
    input, target, weight, lse, total_weight = saved
    if not target.is_floating_point():
        target_t = None
    if input_t is None and target_t is None:
        return None, None
    ones, zeros = _unit(loss_like), _zero(loss_like)
    args = (input, target, weight, lse, total_weight, options, input_t, target_t)
    loss_t = _directional(ones, zeros, *args).to(loss_like.dtype)
    if options.lse_square_scale > 0 and input_t is not None:  # the z-loss does not depend on the target
        z_loss_t = _directional(zeros, ones, *args[:-1], None).to(loss_like.dtype)
    else:
        z_loss_t = torch.zeros_like(loss_t)
    return loss_t, z_loss_t


class _LossGradient(torch.autograd.Function):
    """(grad_input, grad_target) of the backward op, differentiable: the backward op where a
    second-order derivative or a transform may need one."""

    @staticmethod
    def vmap(info, in_dims, *args):
        # One application per batch entry (as the op's vmap rule does), so that a transform
        # below vmap sees each (torch's generated vmap rule for a Function breaks under
        # jacfwd(jacrev(f)), i.e. torch.func.hessian).
        return _stack_entries(_LossGradient.apply, info.batch_size, in_dims, args)

    @staticmethod
    def forward(grad_loss, grad_z_loss, input, target, weight, lse, total_weight, static):
        options, want_target_grad = static.value
        return call(ops.cross_entropy_backward.default, grad_loss, grad_z_loss, input, target, weight, lse,
                    total_weight, *options, want_target_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, static = inputs
        options, want_target_grad = static.value
        _save_gradient_context(ctx, tensors, options, want_target_grad, output)

    @staticmethod
    def backward(ctx, grad_grad_input, grad_grad_target):
        return _gradient_vjp(ctx, grad_grad_input, grad_grad_target) + (None,)

    @staticmethod
    def jvp(ctx, grad_loss_t, grad_z_loss_t, input_t, target_t, weight_t, *_):
        _refuse_nested_forward_mode()
        _no_weight_derivative(weight_t)
        grad_loss, grad_z_loss, input, target, weight, lse, total_weight, grad_input = ctx.saved_tensors
        hx, hy = hessian_product(input_t, target_t if target.is_floating_point() else None, input, target,
                                 weight, grad_loss, grad_z_loss, total_weight, grad_input, ctx.options)
        if grad_loss_t is not None or grad_z_loss_t is not None:
            gx, gy = _LossGradient.apply(
                _zero(grad_loss) if grad_loss_t is None else grad_loss_t,
                _zero(grad_z_loss) if grad_z_loss_t is None else grad_z_loss_t,
                input, target, weight, lse, total_weight, _Static((ctx.options, ctx.want_target_grad)))
            hx = hx + gx
            hy = gy if hy is None else hy + gy
        if not ctx.want_target_grad:
            return hx, None
        return hx, torch.zeros_like(target) if hy is None else hy


def _save_gradient_context(ctx, tensors, options, want_target_grad, output):
    grad_input, grad_target = output
    ctx.save_for_backward(*tensors, grad_input)
    ctx.save_for_forward(*tensors, grad_input)
    ctx.options, ctx.want_target_grad = options, want_target_grad
    if not want_target_grad:
        ctx.mark_non_differentiable(grad_target)
    ctx.set_materialize_grads(False)


def _gradient_vjp(ctx, grad_grad_input, grad_grad_target):
    """The gradients of (grad_loss, grad_z_loss, input, target, weight, lse, total_weight)
    for those of the backward op's (grad_input, grad_target)."""
    grad_loss, grad_z_loss, input, target, weight, lse, total_weight, grad_input = ctx.saved_tensors
    if not ctx.want_target_grad:
        grad_grad_target = None
    if grad_grad_input is None and grad_grad_target is None:
        return (None,) * 7
    needs = ctx.needs_input_grad
    d_input = d_target = d_grad_loss = d_grad_z_loss = None
    if needs[2] or needs[3]:
        d_input, d_target = hessian_product(grad_grad_input, grad_grad_target, input, target, weight, grad_loss,
                                            grad_z_loss, total_weight, grad_input, ctx.options)
    args = (input, target, weight, lse, total_weight, ctx.options, grad_grad_input, grad_grad_target)
    if needs[0]:
        d_grad_loss = _directional(_unit(grad_loss), _zero(grad_z_loss), *args).to(grad_loss.dtype)
    if needs[1] and ctx.options.lse_square_scale > 0 and grad_grad_input is not None:
        d_grad_z_loss = _directional(_zero(grad_loss), _unit(grad_z_loss), *args[:-1], None).to(grad_z_loss.dtype)
    return (d_grad_loss, d_grad_z_loss, d_input if needs[2] else None, d_target if needs[3] else None,
            None, None, None)


def _setup_registered_gradient(ctx, inputs, output):
    tensors, rest = inputs[:7], inputs[7:]
    options, (want_target_grad,) = _options_and(rest, {}, ("compute_grad_target", False))
    _save_gradient_context(ctx, tensors, options, want_target_grad, output)


def _registered_gradient_vjp(ctx, grad_grad_input, grad_grad_target):
    return _gradient_vjp(ctx, grad_grad_input, grad_grad_target) + (None,) * (len(ctx.needs_input_grad) - 7)


torch.library.register_autograd("fastce::cross_entropy_backward", _registered_gradient_vjp,
                                setup_context=_setup_registered_gradient)


def _stack_entries(fn, batch_size, in_dims, args):
    """fn applied to each batch entry of args (batched along in_dims), the results stacked:
    (outputs, out_dims) as a vmap rule returns them."""
    results = []
    for i in range(batch_size):
        results.append(fn(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]))
    outputs = tuple(torch.stack(parts) for parts in zip(*results))
    return outputs, (0,) * len(outputs)


def _vmap_by_loop(op):
    """A vmap rule that runs the op once per batch entry and stacks the results: each entry
    keeps its own 'mean' divisor, as a loop of calls would (torch.func.vmap over a batch of
    samples, e.g. per-sample gradients)."""
    def rule(info, in_dims, *args):
        return _stack_entries(lambda *entry: call(op, *entry), info.batch_size, in_dims, args)
    return rule


for _name in ("cross_entropy_forward", "cross_entropy_backward"):
    torch.library.register_vmap(f"fastce::{_name}", _vmap_by_loop(getattr(ops, _name).default))


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


class _CrossEntropyEager(torch.autograd.Function):
    """_CrossEntropy's forward and backward for plain eager calls (_cheap_apply's fast path
    only): the forward records its context itself, one Python call instead of forward plus
    setup_context, and calls the op below the Autograd key without asking whether it may.
    About 1 us of a 64x10 step's ~30 (benchmarks/README.md); the formulas are _CrossEntropy's."""

    @staticmethod
    def forward(ctx, input, target, weight, options, inplace_backward, compute_grad, loss_dtype=None):
        output = call_below_autograd(ops.cross_entropy_forward.default, input, target, weight, *options,
                                     compute_grad, loss_dtype)
        _CrossEntropy.setup_context(ctx, (input, target, weight, options, inplace_backward, compute_grad), output)
        return output

    backward = staticmethod(_CrossEntropy.backward)


class _CrossEntropyForwardMode(_CrossEntropy):
    """_CrossEntropy with forward-mode AD (torch.func.jvp / jacfwd, forward_ad): applied
    where a transform or a dual level is active, never traced by dynamo (which does not
    trace a Function that defines jvp)."""
    generate_vmap_rule = True  # the ops' vmap rules (_vmap_by_loop) carry it

    @staticmethod
    def forward(input, target, weight, static):
        return _CrossEntropy.forward(input, target, weight, *static.value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, static = inputs
        _CrossEntropy.setup_context(ctx, (input, target, weight, *static.value), output)
        ctx.save_for_forward(input, target, weight, *output[2:4])  # (lse, total_weight)
        ctx.loss_like = output[0].detach()  # the loss's shape and dtype

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss, *_):
        return _CrossEntropy.backward(ctx, grad_loss, grad_z_loss)[:3] + (None,)

    @staticmethod
    def jvp(ctx, input_t, target_t, weight_t, *_):
        _refuse_nested_forward_mode()
        _no_weight_derivative(weight_t)
        loss_t, z_loss_t = _loss_jvp(ctx.saved_tensors, ctx.options, ctx.loss_like, input_t, target_t)
        return loss_t, z_loss_t, None, None, None


@torch.compiler.disable
def _apply_forward_mode(*args):
    """_CrossEntropyForwardMode.apply, run eagerly: under torch.compile a transform of the
    loss graph-breaks here (dynamo would inline the Function's forward for inputs that do
    not require grad, dropping a forward-mode tangent)."""
    return _CrossEntropyForwardMode.apply(*args)


def _cheap_apply(function, eager_function=None):
    """``function.apply`` without its Python wrapper while no torch.func transform is active.

    The wrapper binds default arguments through ``inspect.signature`` on every call (~15 us,
    half a 64x10 batch's forward+backward); its other work, routing torch.func transforms and
    unwrapping tensors that escaped one, is kept: a transform (and torch.compile) takes the
    public path, and escaped tensors (the first three arguments) are unwrapped as the wrapper
    does. The fast path applies ``eager_function`` (a Function for plain eager calls only)
    where given. A torch without these internals gets the public path always."""
    raw = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
    unwrap = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
    if raw is None or unwrap is None:
        return function.apply
    raw_apply = raw.__get__(None, function if eager_function is None else eager_function)

    def apply(input, target, weight, *rest):
        if not _plain_eager():  # (dynamo traces the public one)
            return function.apply(input, target, weight, *rest)
        return raw_apply(unwrap(input), unwrap(target), weight if weight is None else unwrap(weight), *rest)
    return apply


_apply_cross_entropy = _cheap_apply(_CrossEntropy, _CrossEntropyEager)


def cross_entropy_loss(input, target, weight, options, inplace_backward=False, loss_dtype=None):
    """(loss, z_loss) of the forward op with these LossOptions, differentiable; of loss_dtype
    (None: the input's)."""
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    if _transforms_active():  # a transform's or a dual tensor's derivative may be needed
        return _apply_forward_mode(input, target, weight,
                                   _Static((options, inplace_backward, False, loss_dtype)))[:2]
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
