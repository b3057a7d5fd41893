"""Per-token outputs for RL and evaluation: the log-probs of chosen tokens and the entropy of
each position's distribution, from one pass over each row of logits (or of an LM head's
logits, chunk by chunk, without materializing them).

The ops (schemas in csrc/ops.cpp): ``token_logprobs_forward`` / ``token_logprobs_backward``
(C++ kernels, csrc/cpu/token_cpu.cpp) and ``linear_token_logprobs_forward`` / ``_backward``
(implemented here with torch matmuls around the first two, for every device). Each has a fake
kernel and autograd registered below, so ``torch.compile(fullgraph=True)`` traces them as
opaque nodes.

The logits are transformed in this order: ``logit_scale``, then ``softcap``, then divided by
``temperature``: ``z = softcap * tanh(logit_scale * x / softcap) / temperature``.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._errors import retyped
from ._ops import call, ops
from .linear import _acc_dtype, _chunk_rows, _grads_or_empty


class TokenOptions(NamedTuple):
    """The options of the token ops after their tensors, in the schemas' order (csrc/ops.cpp)."""
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None


def _options(rest, kwargs):
    """TokenOptions and the trailing arguments of a call (positional, or named by a user)."""
    n = len(TokenOptions._fields)
    options = TokenOptions(*rest[:n])._replace(**{k: kwargs[k] for k in TokenOptions._fields if k in kwargs})
    return options, list(rest[n:]), kwargs


def _arg(trailing, kwargs, i, name, default):
    return kwargs.get(name, trailing[i] if i < len(trailing) else default)


def _invoke(op, *args):
    """op(*args) with torch's exception types; through autograd where it has something to record."""
    try:
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return op(*args)
        return call(op, *args)
    except RuntimeError as error:
        typed = retyped(error)
        if typed is None:
            raise
        raise typed from None


# ---- token_logprobs_forward / _backward: fakes and autograd ---------------------------------

@torch.library.register_fake("fastce::token_logprobs_forward")
def _forward_fake(logits, index, *rest, **kwargs):
    _, trailing, kwargs = _options(rest, kwargs)
    compute_entropy = _arg(trailing, kwargs, 0, "compute_entropy", False)
    compute_argmax = _arg(trailing, kwargs, 1, "compute_argmax", False)
    if logits.dim() < 1:
        raise RuntimeError("token_logprobs: logits must have a class dimension, got a 0-d tensor")
    acc = _acc_dtype(logits.dtype)
    rows = logits.shape[:-1]
    return (logits.new_empty(index.shape, dtype=acc),
            logits.new_empty(rows if compute_entropy else (0,), dtype=acc),
            logits.new_empty(rows, dtype=torch.float64),
            logits.new_empty(rows if compute_argmax else (0,), dtype=torch.long))


@torch.library.register_fake("fastce::token_logprobs_backward")
def _backward_fake(grad_logprobs, grad_entropy, logits, index, lse, entropy, *rest, **kwargs):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, index, *rest = inputs
    options, _, _ = _options(rest, {})
    _, entropy, lse, argmax = output
    ctx.save_for_backward(logits, index, lse, entropy)
    ctx.options = options
    ctx.entropy_computed = _arg(rest[len(TokenOptions._fields):], {}, 0, "compute_entropy", False)
    ctx.mark_non_differentiable(lse, argmax)
    ctx.set_materialize_grads(False)  # None for an unused output: no zero tensors


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse, _grad_argmax):
    nothing = (None,) * (len(ctx.needs_input_grad) - 1)
    if not ctx.entropy_computed:  # (an empty output: a traced graph may still pass it a gradient)
        grad_entropy = None
    if not ctx.needs_input_grad[0] or (grad_logprobs is None and grad_entropy is None):
        return (None, *nothing)
    logits, index, lse, entropy = ctx.saved_tensors
    args = (grad_logprobs, grad_entropy, logits, index, lse, entropy, *ctx.options)
    if torch.is_grad_enabled():  # create_graph=True: through autograd, which refuses double backward
        grad = ops.token_logprobs_backward.default(*args)
    else:
        grad = call(ops.token_logprobs_backward.default, *args)
    return (grad, *nothing)


torch.library.register_autograd("fastce::token_logprobs_forward", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastce's token log-probs do not support double backward (create_graph=True through their "
        "gradient); use torch.log_softmax for higher-order derivatives")


for _name in ("token_logprobs_backward", "linear_token_logprobs_backward"):
    torch.library.register_autograd(f"fastce::{_name}", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _token_options(temperature, logit_scale=1.0, softcap=None):
    return TokenOptions(float(temperature), float(logit_scale), None if softcap is None else float(softcap))


def token_logprobs(logits: Tensor, index: Tensor, *, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probabilities of chosen tokens: ``log_softmax(logits / temperature, -1)`` gathered at
    ``index``, without the ``(*, V)`` log-softmax.

    - ``logits``: ``(*, V)``, any floating dtype and any strides.
    - ``index``: ``(*)`` (one token per position) or ``(*, K)`` (K tokens per position), int64 or
      int32, any strides.
    - Returns the log-probs, shaped as ``index``, in float32 (float64 for float64 logits); with
      ``return_entropy=True`` the pair ``(logprobs, entropy)``, the entropy ``(*)`` of each
      position's distribution, ``-sum(p * log p)``.

    Differentiable with respect to ``logits`` through both outputs. Masked vocabulary entries
    (``-inf`` logits) have probability 0: the entropy stays finite, the log-prob of a masked token
    is ``-inf``.
    """
    out = _invoke(ops.token_logprobs_forward.default, logits, index, *_token_options(temperature),
                  bool(return_entropy))
    return (out[0], out[1]) if return_entropy else out[0]


def entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """The entropy ``-sum(p * log p)`` of ``softmax(logits / temperature, -1)``, shape ``(*)`` for
    logits ``(*, V)``, in float32 (float64 for float64 logits); one pass over each row,
    differentiable. ``-inf`` logits (masked entries) have probability 0 and add nothing."""
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise RuntimeError("entropy: logits must be a tensor with a class dimension")
    no_tokens = logits.new_empty((*logits.shape[:-1], 0), dtype=torch.long)
    return _invoke(ops.token_logprobs_forward.default, logits, no_tokens, *_token_options(temperature), True)[1]


# ---- the fused LM head -----------------------------------------------------------------------

def _chunk_logits(x, w, b, buf, start, end):
    logits = buf[: end - start]
    if b is None:
        torch.mm(x[start:end], w.t(), out=logits)
    else:
        torch.addmm(b, x[start:end], w.t(), out=logits)
    return logits


@torch.library.impl("fastce::linear_token_logprobs_forward", "CompositeExplicitAutograd")
def _linear_forward_impl(input, linear_weight, linear_bias, index, *rest, **kwargs):
    """Each chunk's logits into one reused buffer, then the token op on them."""
    options, trailing, kwargs = _options(rest, kwargs)
    compute_entropy = _arg(trailing, kwargs, 0, "compute_entropy", True)
    chunk_size = _arg(trailing, kwargs, 1, "chunk_size", None)
    rows, classes = input.shape[0], linear_weight.shape[0]
    acc = _acc_dtype(input.dtype)
    logprobs = input.new_empty(index.shape, dtype=acc)
    ent = input.new_empty((rows,) if compute_entropy else (0,), dtype=acc)
    lse = input.new_empty((rows,), dtype=torch.float64)
    chunk = _chunk_rows(rows, classes, input.dtype, input.device, chunk_size)
    buf = input.new_empty((min(chunk, rows), classes))
    # Argument errors (index dtype, shapes) from the kernel, before any matmul.
    call(ops.token_logprobs_forward.default, buf[:0], index[:0], *options, compute_entropy)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        logits = _chunk_logits(input, linear_weight, linear_bias, buf, start, end)
        lp_c, ent_c, lse_c, _ = call(ops.token_logprobs_forward.default, logits, index[start:end], *options,
                                     compute_entropy)
        logprobs[start:end] = lp_c
        lse[start:end] = lse_c
        if compute_entropy:
            ent[start:end] = ent_c
    return logprobs, ent, lse


@torch.library.impl("fastce::linear_token_logprobs_backward", "CompositeExplicitAutograd")
def _linear_backward_impl(grad_logprobs, grad_entropy, input, linear_weight, linear_bias, index, lse, entropy,
                          *rest, **kwargs):
    """Recomputes each chunk's logits, takes their gradient from the token op, and turns it into
    the chunk's share of the requested gradients (the weight's and bias' accumulated in float32
    for low-precision parameters)."""
    options, trailing, kwargs = _options(rest, kwargs)
    chunk_size = _arg(trailing, kwargs, 0, "chunk_size", None)
    want_x, want_w, want_b = (_arg(trailing, kwargs, 1 + i, name, False) for i, name in
                              enumerate(("grad_input", "grad_linear_weight", "grad_linear_bias")))
    want_b = want_b and linear_bias is not None
    rows, classes = input.shape[0], linear_weight.shape[0]
    acc = _acc_dtype(input.dtype)
    gx = input.new_zeros(input.shape) if want_x else None
    gw = linear_weight.new_zeros(linear_weight.shape, dtype=acc) if want_w else None
    gb = linear_weight.new_zeros((classes,), dtype=acc) if want_b else None
    if grad_logprobs is not None or grad_entropy is not None:
        chunk = _chunk_rows(rows, classes, input.dtype, input.device, chunk_size)
        buf = input.new_empty((min(chunk, rows), classes))
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            logits = _chunk_logits(input, linear_weight, linear_bias, buf, start, end)
            g = call(ops.token_logprobs_backward.default,
                     None if grad_logprobs is None else grad_logprobs[start:end],
                     None if grad_entropy is None else grad_entropy[start:end], logits, index[start:end],
                     lse[start:end], entropy[start:end] if grad_entropy is not None else entropy, *options)
            if want_x:
                torch.mm(g, linear_weight, out=gx[start:end])
            if want_w:
                gw.addmm_(g.t().to(acc), input[start:end].to(acc))
            if want_b:
                gb += g.sum(0, dtype=acc)
            del g
    return _grads_or_empty(input, linear_weight, (gx, gw, gb), linear_weight.dtype)


@torch.library.register_fake("fastce::linear_token_logprobs_forward")
def _linear_forward_fake(input, linear_weight, linear_bias, index, *rest, **kwargs):
    _, trailing, kwargs = _options(rest, kwargs)
    compute_entropy = _arg(trailing, kwargs, 0, "compute_entropy", True)
    acc = _acc_dtype(input.dtype)
    rows = input.shape[0]
    return (input.new_empty(index.shape, dtype=acc), input.new_empty((rows,) if compute_entropy else (0,), dtype=acc),
            input.new_empty((rows,), dtype=torch.float64))


@torch.library.register_fake("fastce::linear_token_logprobs_backward")
def _linear_backward_fake(grad_logprobs, grad_entropy, input, linear_weight, linear_bias, index, lse, entropy,
                          *rest, **kwargs):
    _, trailing, kwargs = _options(rest, kwargs)
    flags = [_arg(trailing, kwargs, 1 + i, name, False) for i, name in
             enumerate(("grad_input", "grad_linear_weight", "grad_linear_bias"))]
    flags[2] = flags[2] and linear_bias is not None
    dtype = linear_weight.dtype
    return _grads_or_empty(input, linear_weight, (
        input.new_empty(input.shape) if flags[0] else None,
        linear_weight.new_empty(linear_weight.shape) if flags[1] else None,
        linear_weight.new_empty(linear_weight.shape[:1]) if flags[2] else None), dtype)


def _linear_setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, index, *rest = inputs
    options, trailing, _ = _options(rest, {})
    _, ent, lse = output
    ctx.options = options
    ctx.chunk_size = _arg(trailing, {}, 1, "chunk_size", None)
    ctx.entropy_computed = _arg(trailing, {}, 0, "compute_entropy", True)
    ctx.save_for_backward(input, linear_weight, linear_bias, index, lse, ent)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    input, linear_weight, linear_bias, index, lse, ent = ctx.saved_tensors
    want = ctx.needs_input_grad[:3]
    if not ctx.entropy_computed:
        grad_entropy = None
    rest = (None,) * (len(ctx.needs_input_grad) - 3)
    if not any(want) or (grad_logprobs is None and grad_entropy is None):
        return (None, None, None, *rest)
    gx, gw, gb = ops.linear_token_logprobs_backward.default(
        grad_logprobs, grad_entropy, input, linear_weight, linear_bias, index, lse, ent, *ctx.options,
        ctx.chunk_size, *want)
    return (gx if want[0] else None, gw if want[1] else None, gb if want[2] else None, *rest)


torch.library.register_autograd("fastce::linear_token_logprobs_forward", _linear_backward,
                                setup_context=_linear_setup_context)


def _check_linear_shapes(hidden, linear_weight, index, linear_bias):
    if hidden.dim() < 1:
        raise RuntimeError(f"expected hidden with dimensionality at least 1, got {hidden.dim()}")
    if linear_weight.dim() != 2:
        raise RuntimeError(f"expected linear_weight of shape (V, H), got {tuple(linear_weight.shape)}")
    if hidden.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal hidden and linear_weight last dimensions (in_features), "
            f"got {hidden.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    if linear_bias is not None and tuple(linear_bias.shape) != (linear_weight.shape[0],):
        raise RuntimeError(f"expected linear_bias shape {(linear_weight.shape[0],)}, got {tuple(linear_bias.shape)}")
    batch = tuple(hidden.shape[:-1])
    if tuple(index.shape) == batch:
        return batch, False
    if index.dim() == len(batch) + 1 and tuple(index.shape[:-1]) == batch:
        return batch, True
    raise RuntimeError(f"linear_token_logprobs: index of shape {list(index.shape)} does not match hidden of "
                       f"shape {list(hidden.shape)}: expected {list(batch)} or {list(batch)} + [K]")


def linear_token_logprobs(
    hidden: Tensor,
    linear_weight: Tensor,
    index: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = True,
    chunk_size: Optional[int] = None,
):
    """``token_logprobs(linear(hidden, linear_weight, linear_bias), index, ...)`` and the entropy,
    without materializing the logits (the LM head and the per-token outputs fused, chunk by chunk
    as in :func:`fastce.linear_cross_entropy`).

    - ``hidden``: ``(*, H)``; ``linear_weight``: ``(V, H)``; ``linear_bias``: ``(V)`` or None;
      ``index``: ``(*)`` or ``(*, K)``.
    - Logits are transformed in this order: ``logit_scale``, then ``softcap``, then ``/ temperature``.
    - Returns ``(logprobs, entropy)`` (``logprobs`` alone with ``return_entropy=False``), in
      float32 (float64 for float64 inputs). Backward takes gradients for both outputs and gives
      those of ``hidden``, ``linear_weight`` and ``linear_bias``; it recomputes each chunk's logits.
    - ``chunk_size``: rows per chunk; by default chosen from the shapes and the device.
    """
    batch, several = _check_linear_shapes(hidden, linear_weight, index, linear_bias)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    rows = math.prod(batch)
    x = hidden.reshape(rows, hidden.shape[-1])
    idx = index.reshape(rows, index.shape[-1]) if several else index.reshape(rows)
    options = _token_options(temperature, logit_scale, softcap)
    logprobs, ent, _ = _invoke(ops.linear_token_logprobs_forward.default, x, linear_weight, linear_bias, idx,
                               *options, bool(return_entropy), chunk_size)
    logprobs = logprobs.reshape(index.shape)
    if not return_entropy:
        return logprobs
    return logprobs, ent.reshape(batch)


# ---- token accuracy, predicted tokens and token scaling on the losses --------------------------

_NONE, _MEAN = 0, 1  # reductions (LossOptions.reduction)


class CrossEntropyOutput(NamedTuple):
    """What :func:`fastce.cross_entropy` and :func:`fastce.linear_cross_entropy` return when an
    extra per-token output is requested (fields not requested are None)."""
    loss: Tensor
    z_loss: Optional[Tensor] = None
    token_accuracy: Optional[Tensor] = None
    predicted_tokens: Optional[Tensor] = None


def _check_class_targets(target, what):
    if target.is_floating_point():
        raise ValueError(f"{what}: return_token_accuracy, return_predicted_tokens and use_token_scaling take "
                         "class-index targets, not probabilities")


def _accuracy(predicted, target, ignore_index, reduction):
    """Predicted tokens (-1 at ignored positions) and the token accuracy: per token (0 at ignored
    ones) for reduction 'none', else the fraction of non-ignored tokens predicted right (NaN when
    there is none, as a 'mean' loss)."""
    valid = target != ignore_index
    predicted = torch.where(valid, predicted, -1)
    correct = (predicted == target) & valid
    if reduction == _NONE:
        return correct.to(torch.float32), predicted
    return correct.sum(dtype=torch.float32) / valid.sum(dtype=torch.float32), predicted


def _scaled_reduction(loss_rows, z_rows, p_target, divisors, reduction, dtype):
    """Token scaling: each token's loss (and z-loss) times the detached probability of its target,
    then reduced as the loss ('mean': rules.h's divisors, as linear.py's _mean)."""
    from .linear import _mean
    scale = p_target.detach()
    loss_rows = (loss_rows * scale).to(dtype)
    z_rows = (z_rows * scale).to(dtype)
    if reduction == _NONE:
        return loss_rows, z_rows
    acc = _acc_dtype(dtype)
    loss, z = loss_rows.sum(dtype=acc), z_rows.sum(dtype=acc)
    if reduction == _MEAN:
        loss, z = _mean(loss, z, divisors), z / divisors[1]
    return loss.to(dtype), z.to(dtype)


def cross_entropy_token_outputs(input, target, weight, options, inplace_backward, return_z_loss,
                                return_token_accuracy, return_predicted_tokens, use_token_scaling, loss_dtype=None):
    """fastce.cross_entropy with extra per-token outputs (see its docstring)."""
    from ._ops import cross_entropy_loss
    from .linear import _total_weight
    _check_class_targets(target, "cross_entropy")
    class_dim = 1 if input.dim() >= 2 else 0
    want_argmax = return_token_accuracy or return_predicted_tokens
    if use_token_scaling:
        loss_rows, z_rows = cross_entropy_loss(input, target, weight, options._replace(reduction=_NONE),
                                               inplace_backward, loss_dtype)
    else:
        loss, z_loss = cross_entropy_loss(input, target, weight, options, inplace_backward, loss_dtype)
    ignored = target == options.ignore_index
    with torch.no_grad():
        # One pass of the token op: the target's log-prob (token scaling) and the argmax of z.
        logp, _, _, argmax = call(ops.token_logprobs_forward.default, input.detach().movedim(class_dim, -1),
                                  torch.where(ignored, 0, target), 1.0, options.logit_scale, options.softcap,
                                  False, want_argmax)
    if use_token_scaling:
        with torch.no_grad():
            p_target = torch.where(ignored, 0.0, logp.exp())
            total = _total_weight(target, weight, input.shape[class_dim], options.ignore_index, False,
                                  _acc_dtype(input.dtype))
        loss, z_loss = _scaled_reduction(loss_rows, z_rows, p_target, total, options.reduction, loss_rows.dtype)
    accuracy = predicted = None
    if want_argmax:
        accuracy, predicted = _accuracy(argmax, target, options.ignore_index, options.reduction)
    return CrossEntropyOutput(loss, z_loss if return_z_loss else None,
                              accuracy if return_token_accuracy else None,
                              predicted if return_predicted_tokens else None)


def _linear_target_stats(x, w, b, index, logit_scale, softcap, chunk_size, want_argmax):
    """The log-prob of index and the argmax of z for each row of x @ w.T + b, from one pass of the
    token op over each chunk's logits (never whole)."""
    rows, classes = x.shape[0], w.shape[0]
    logp = x.new_empty((rows,), dtype=_acc_dtype(x.dtype))
    argmax = torch.empty(rows if want_argmax else 0, dtype=torch.long, device=x.device)
    chunk = _chunk_rows(rows, classes, x.dtype, x.device, chunk_size)
    buf = x.new_empty((min(chunk, rows), classes))
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        lp_c, _, _, arg_c = call(ops.token_logprobs_forward.default, _chunk_logits(x, w, b, buf, start, end),
                                 index[start:end], 1.0, logit_scale, softcap, False, want_argmax)
        logp[start:end] = lp_c
        if want_argmax:
            argmax[start:end] = arg_c
    return logp, argmax


def linear_cross_entropy_token_outputs(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                       return_token_accuracy, return_predicted_tokens, use_token_scaling, **options):
    """fastce.linear_cross_entropy with extra per-token outputs (see its docstring). The argmax and
    the targets' probabilities take passes of their own over the chunks' logits."""
    from .functional import _reduction_enum
    from .linear import _total_weight, linear_cross_entropy
    _check_class_targets(target, "linear_cross_entropy")
    if linear_weight.dim() != 2:
        raise NotImplementedError("linear_cross_entropy: per-token outputs need a (V, H) linear_weight")
    ignore_index = -100 if ignore_index is None else ignore_index
    red = _reduction_enum(reduction)
    shift, unshift = options.pop("shift", 0), None
    if shift:  # shifted once here: every output below is per shifted position
        from .linear import _shifted
        input, target, unshift = _shifted(input, target, shift, ignore_index, linear_weight)
    kw = dict(linear_bias=linear_bias, weight=weight, ignore_index=ignore_index, **options)
    x = input.reshape(-1, input.shape[-1]).detach()
    b = None if linear_bias is None else linear_bias.detach()
    t = target.reshape(-1)
    want_argmax = return_token_accuracy or return_predicted_tokens
    if use_token_scaling:
        loss_rows = linear_cross_entropy(input, linear_weight, target, reduction="none", **kw)
    else:
        loss = linear_cross_entropy(input, linear_weight, target, reduction=reduction, **kw)
    with torch.no_grad():  # one more pass over the chunks: the target's log-prob and the argmax
        logp, argmax = _linear_target_stats(x, linear_weight.detach(), b, torch.where(t == ignore_index, 0, t),
                                            float(options.get("logit_scale", 1.0)), options.get("softcap"),
                                            options.get("chunk_size"), want_argmax)
    if use_token_scaling:
        with torch.no_grad():
            p_target = torch.where(t == ignore_index, 0.0, logp.exp()).reshape(target.shape)
            total = _total_weight(t, weight, linear_weight.shape[0], ignore_index, False, _acc_dtype(input.dtype))
        loss, _ = _scaled_reduction(loss_rows, torch.zeros_like(loss_rows), p_target, total, red, loss_rows.dtype)
    accuracy = predicted = None
    if want_argmax:
        accuracy, predicted = _accuracy(argmax.reshape(target.shape), target, ignore_index, red)
    if unshift is not None:
        predicted = None if predicted is None else unshift(predicted)
        if red == _NONE:
            loss = unshift(loss)
            accuracy = None if accuracy is None else unshift(accuracy)
    return CrossEntropyOutput(loss, None, accuracy if return_token_accuracy else None,
                              predicted if return_predicted_tokens else None)
