"""Op registration on the Python side: fake (meta) kernels for tracing, autograd, and the eager
fast path that applies the same autograd formula with less Python per call.

The schemas and the CPU/CUDA kernels live in C++ (csrc/); `import fastce._C` loads them.
"""
import math

import torch

try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
except ImportError:  # a torch without it: always take the registered autograd path
    def is_in_torch_dispatch_mode():
        return True

from . import _C  # registers torch.ops.fastce.*

ops = torch.ops.fastce


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


@torch.library.register_fake("fastce::cross_entropy_forward")
def _forward_fake(input, target, weight, reduction, ignore_index, label_smoothing, logit_scale,
                  softcap, lse_square_scale, inplace_backward, compute_grad=False, grad_scale=1.0):
    _check_devices(input, target, weight)
    rows = _row_shape(input)
    loss_shape = rows if reduction == 0 else ()
    acc = _acc_dtype(input)
    return (input.new_empty(loss_shape), input.new_empty(loss_shape),
            input.new_empty(rows, dtype=torch.float64), input.new_empty((), dtype=acc),
            input.new_empty(input.shape if compute_grad else (0,)))


@torch.library.register_fake("fastce::cross_entropy_backward")
def _backward_fake(grad_loss, grad_z_loss, input, target, weight, lse, total_weight, reduction,
                   ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale,
                   compute_grad_target):
    grad_target_shape = input.shape if compute_grad_target and target.shape == input.shape else (0,)
    return input.new_empty(input.shape), input.new_empty(grad_target_shape)


@torch.library.register_fake("fastce::cross_entropy_backward_inplace")
def _backward_inplace_fake(grad_loss, grad_z_loss, input, target, weight, lse, total_weight,
                           reduction, ignore_index, label_smoothing, logit_scale, softcap,
                           lse_square_scale):
    return None


_BACKWARD_OPTIONS = 6  # reduction ... lse_square_scale: the options the backward ops take


def _save_for_backward(ctx, input, target, weight, options, lse, total_weight):
    # options: the op's arguments after `weight` (reduction ... inplace_backward[, compute_grad,
    # grad_scale])
    ctx.save_for_backward(input, target, weight, lse, total_weight)
    ctx.options = options[:_BACKWARD_OPTIONS]
    ctx.inplace_backward = options[_BACKWARD_OPTIONS]
    ctx.set_materialize_grads(False)  # _backward takes None for unused outputs: no zero tensors


def _setup_context(ctx, inputs, output):
    input, target, weight, *options = inputs
    _, _, lse, total_weight, grad_input = output
    _save_for_backward(ctx, input, target, weight, tuple(options), lse, total_weight)
    ctx.mark_non_differentiable(lse, total_weight, grad_input)


def _tracing(t):
    # Under torch.compile the backward graph is traced with fake/functional tensors; a
    # write into a saved input cannot be expressed there, so it is computed out of place.
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or torch._is_functional_tensor(t))


def _backward(ctx, grad_loss, grad_z_loss, *_grads_of_non_differentiable_outputs):
    if grad_loss is None and grad_z_loss is None:
        return (None,) * 12
    input, target, weight, lse, total_weight = ctx.saved_tensors
    if grad_z_loss is None:
        grad_z_loss = torch.zeros_like(grad_loss)
    if grad_loss is None:
        grad_loss = torch.zeros_like(grad_z_loss)
    grad_target = None
    # With create_graph=True the gradient must not be the logits tensor itself, and the
    # backward op must go through autograd (which refuses double backward).
    plain = not torch.is_grad_enabled() and (getattr(ctx, "eager", False) or not _tracing(input))
    if ctx.inplace_backward and plain:
        _C.backward_inplace_below_autograd(grad_loss, grad_z_loss, input, target, weight, lse,
                                           total_weight, *ctx.options)
        # The logits now hold their gradient: make autograd reject any later use of them.
        torch.autograd.graph.increment_version(input)
        grad_input = input
    else:
        want_target_grad = ctx.needs_input_grad[1]
        backward_op = ops.cross_entropy_backward.default
        args = (grad_loss, grad_z_loss, input, target, weight, lse, total_weight, *ctx.options,
                want_target_grad)
        grad_input, grad_target = _C.backward_below_autograd(*args) if plain else backward_op(*args)
        if not want_target_grad:
            grad_target = None
    return (grad_input if ctx.needs_input_grad[0] else None, grad_target) + (None,) * 10


torch.library.register_autograd("fastce::cross_entropy_forward", _backward,
                                setup_context=_setup_context)


# ---- the eager fast path -------------------------------------------------------------------
# torch.library's generic autograd wrapper costs about 40 us of Python per call (it refills
# the schema's defaults and redispatches from Python): more than torch's whole step on a
# 64x10 batch. Outside tracing, the same formula (_setup_context, _backward) is applied by
# a plain autograd.Function around the op called below the Autograd key (through _C's typed
# calls: csrc/python_module.cpp). Under torch.compile, export, dispatch modes and tensor
# subclasses the registered path is used.

def _saved_tensor_hooks_probe():
    # Checkpointing (non-reentrant) and offloading act through saved-tensor hooks; a gradient
    # held from the forward pass would escape them, so none is computed under them.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return lambda: True
    try:
        top(False)
        return lambda: top(False) is not None
    except TypeError:  # a torch whose function takes no argument
        return lambda: top() is not None


_saved_tensor_hooks_active = _saved_tensor_hooks_probe()


class _ExpectedGradient:
    # The incoming gradient (grad_loss) the next forward computes the logits' gradient for:
    # what the last eager backward that could have used a forward-pass gradient got, when it
    # was a finite nonzero number and the z-loss output was unused (loss.backward(): 1;
    # loss / k: 1/k; a GradScaler's scale), else None (then none is computed). A loop whose
    # incoming gradient changes pays for one gradient it must recompute per change. Results
    # are the same bits either way (the forward op computes for grad_scale exactly as the
    # backward op does for that grad_loss), so this only moves time.
    value = 1.0


# A legacy-vmap gradient (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)) has
# no single value.
_is_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _expected_from(grad_loss, grad_z_loss):
    if grad_z_loss is not None or grad_loss is None or torch.is_grad_enabled() or _is_batched(grad_loss):
        return None  # (create_graph=True needs a gradient autograd can differentiate)
    g = grad_loss.item()
    return g if g != 0.0 and math.isfinite(g) else None


def _can_use_gradient_in_forward(input, target, options):
    # On the CPU, a reduced loss whose logits need a gradient can get it in the forward pass:
    # each row is read from memory once instead of twice, and a step is one op call, not
    # two. Not for probability targets that need a gradient themselves, not with
    # inplace_backward (the logits must stay intact until the backward pass), not under
    # saved-tensor hooks.
    reduction, inplace_backward = options[0], options[_BACKWARD_OPTIONS]
    return (input.is_cpu and input.requires_grad and reduction != 0 and not inplace_backward
            and not target.requires_grad and not _saved_tensor_hooks_active())


class _EagerCrossEntropy(torch.autograd.Function):
    # Four inputs and two outputs rather than the op's twelve and five: autograd's
    # per-argument bookkeeping is a good part of the cost on small batches.
    @staticmethod
    def forward(ctx, input, target, weight, options):
        ctx.could_use_grad = _can_use_gradient_in_forward(input, target, options)
        scale = _ExpectedGradient.value if ctx.could_use_grad else None
        loss, z_loss, lse, total_weight, grad_input = _C.forward_below_autograd(
            input, target, weight, *options, scale is not None, 1.0 if scale is None else scale)
        _save_for_backward(ctx, input, target, weight, options, lse, total_weight)
        ctx.grad_input, ctx.grad_scale = (None, None) if scale is None else (grad_input, scale)
        ctx.eager = True  # known untraced: _backward skips that test
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss):
        grad_input, ctx.grad_input = ctx.grad_input, None  # once: a second backward recomputes
        if ctx.could_use_grad:
            expected = _ExpectedGradient.value = _expected_from(grad_loss, grad_z_loss)
            if grad_input is not None and expected == ctx.grad_scale:
                # The gradient of the loss as computed, even if the logits were modified in
                # place since (torch's own gradient does not read them either). Recomputing
                # reads them: then autograd's version check raises.
                return grad_input, None, None, None
        del grad_input  # free it before the backward op allocates the recomputed one
        grads = _backward(ctx, grad_loss, grad_z_loss)
        return grads[0], grads[1], None, None


# A tensor that escaped a torch.func transform is still its wrapper: autograd.Function.apply
# unwraps it, so those calls take the registered path.
_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _plain_eager(input, target):
    return (type(input) is torch.Tensor and type(target) is torch.Tensor
            and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode()
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active()
            and not _functorch_wrapped(input) and not _functorch_wrapped(target))


def _bind_function_apply(function):
    # autograd.Function.apply without its Python wrapper, which binds default arguments,
    # routes functorch transforms and unwraps tensors that escaped one (both excluded by
    # _plain_eager): ~2 us of a 64x10 step.
    base_apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
    try:
        return base_apply.__get__(None, function)
    except AttributeError:  # a torch without it: the documented path
        return function.apply


_apply_eager = _bind_function_apply(_EagerCrossEntropy)


def cross_entropy_loss(input, target, weight, *options):
    """(loss, z_loss) of torch.ops.fastce.cross_entropy_forward (same arguments), through the
    eager fast path when it applies."""
    if not _plain_eager(input, target):
        return ops.cross_entropy_forward(input, target, weight, *options)[:2]
    if torch.is_grad_enabled() and (input.requires_grad or target.requires_grad):
        return _apply_eager(input, target, weight, options)
    return _C.forward_below_autograd(input, target, weight, *options, False, 1.0)[:2]


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastce.cross_entropy does not support double backward (create_graph=True through its "
        "gradient); use torch.nn.functional.cross_entropy for higher-order derivatives")


def _no_double_backward_setup(ctx, inputs, output):
    pass


torch.library.register_autograd("fastce::cross_entropy_backward", _no_double_backward,
                                setup_context=_no_double_backward_setup)
