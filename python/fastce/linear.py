"""Fused linear + cross-entropy: the LM head and the loss without materializing the logits.

The rows of ``input`` are processed in chunks: the chunk's logits are computed with a torch
matmul into one reused buffer, fastce's kernels give the chunk's loss and (in the same buffer)
its logit gradient, and two more matmuls turn that into the chunk's share of grad_input and
grad_weight. Peak extra memory is one chunk of logits plus the gradients themselves.

- 'mean' / 'sum': the gradients (for unit grad_output) are computed in the forward pass,
  which needs no second pass over the logits; backward only scales them by grad_output.
- 'none': the per-row grad_output is only known in backward, which recomputes the logits
  (the forward pass keeps the rows' log-sum-exp so it does not rerun the loss kernel).

Both loops are ops of the fastce library (schemas in csrc/ops.cpp, with the loss ops' options),
implemented here for every device, with fake kernels and autograd, so
``torch.compile(fullgraph=True)`` traces them as opaque nodes without a graph break.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._errors import raise_as_torch
from ._ops import LossOptions, _options_and, _tracing, _transforms_active, call, cross_entropy_loss, ops
from .functional import _ARGUMENT_ERRORS, _reduction_enum, as_torch_target

_NONE, _MEAN, _SUM = 0, 1, 2

# Bytes of logits per chunk when the caller does not choose. On the CPU a chunk that stays
# within a few tens of MiB keeps the loss kernel close to the cache and the matmuls at full
# speed; GPUs want bigger matmuls and have the memory for them.
_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
_DEFAULT_CHUNK_BYTES = 128 << 20
# Below this many rows the matmuls lose efficiency faster than memory shrinks: on a CPU a
# 64-row chunk runs them at about half the speed of a 256-row one (docs/HF.md).
_MIN_CHUNK_ROWS = 256


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(rows, row_classes, dtype, device, chunk_size):
    """Rows per chunk: the user's choice, or as many as fit the device's logits budget."""
    if chunk_size is not None:
        return max(1, min(chunk_size, rows))
    elem = torch.empty((), dtype=dtype).element_size()
    acc = _acc_dtype(dtype)
    if acc != dtype:  # the weight gradient's matmul takes a float32 copy of the chunk
        elem += torch.empty((), dtype=acc).element_size()
    budget = _CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES)
    fit = budget // max(1, row_classes * elem)
    fit = max(_MIN_CHUNK_ROWS, fit // 8 * 8)  # multiples of 8 keep matmul tiles aligned
    return max(1, min(fit, rows))


def _total_weight(target, weight, classes, ignore_index, prob, acc):
    """The divisors of 'mean' as the loss kernel's total_weight output holds them (rules.h:
    Divisors: the total weight, the non-ignored rows), from tensor ops: no host sync."""
    if prob:
        return target.new_full((2,), target.numel() // classes, dtype=acc)  # no host-to-device copy
    valid = target != ignore_index
    counted = valid.sum(dtype=acc)
    if weight is None:
        return torch.stack([counted, counted])
    w_t = weight.to(acc)[target.long().clamp(0, classes - 1)]  # the kernel rejects bad targets
    return torch.stack([torch.where(valid, w_t, 0).sum(dtype=acc), counted])


# Classes per block of the low-precision weight gradient's matmul (see _accumulate_weight_grad):
# its product, 4 MiB at H=256 in bfloat16, is added to the accumulator while in cache.
_WEIGHT_GRAD_BLOCK = 8192


def _accumulate_weight_grad(gw, grad, x):
    """gw += grad^T x, with gw in float32/float64 (the accumulator) and grad, x in the input's
    dtype. For 16-bit inputs the matmul runs in their dtype (the CPU's and GPU's 16-bit units
    accumulate in float32 and round each block's product once; converting the chunk to float32
    first made it 3.4x slower on an AVX-512 BF16 CPU), block by block over the classes so that
    no V x H product is held besides the accumulator."""
    if grad.dtype == gw.dtype:
        gw.addmm_(grad.t(), x)
        return
    grad_t = grad.t()
    for start in range(0, gw.shape[0], _WEIGHT_GRAD_BLOCK):
        block = slice(start, start + _WEIGHT_GRAD_BLOCK)
        gw[block] += torch.mm(grad_t[block], x)


def _mean(sum_loss, sum_z, divisors):
    """'mean' of the summed losses (z-loss included) and z-losses: rules.h's reduce_losses (the
    cross-entropy over the total weight, the z-loss over the non-ignored rows)."""
    return (sum_loss - sum_z) / divisors[0] + sum_z / divisors[1]


def _loop(x, w, b, target, weight, opts, chunk_size, lse, grad_loss, want_x, want_w, want_b, loss_dtype=None):
    """One pass over the row chunks (on real tensors, inside the custom ops).

    x (N, H); w (V, *d, H); b (V, *d) or None; target (N, *d) class indices or (N, V, *d)
    probabilities. Without ``lse`` it runs the loss kernel (returning the loss and the rows'
    lse); with ``grad_loss`` (a scalar for 'mean'/'sum', per row for 'none') it also
    accumulates the requested gradients. Returns loss, lse, grad_x, grad_w, grad_b (None
    when not computed; grad_w and grad_b in float32 for low-precision weights). The loss is of
    loss_dtype (None: x's).
    """
    rows, hidden = x.shape
    classes, spatial = w.shape[0], tuple(w.shape[1:-1])
    w2 = w.reshape(-1, hidden)
    b2 = None if b is None else b.reshape(-1)
    prob = target.dim() == 2 + len(spatial)
    acc = _acc_dtype(x.dtype)
    reduction = opts.reduction
    sum_opts = opts._replace(reduction=_NONE if reduction == _NONE else _SUM)

    chunk = _chunk_rows(rows, w2.shape[0], x.dtype, x.device, chunk_size)
    buf = x.new_empty((min(chunk, rows), w2.shape[0]))
    # The kernel writes the gradient over the logits when they are a plain 2-D buffer.
    inplace = not spatial

    forward = lse is None
    grads = grad_loss is not None
    # The kernel checks the arguments (weight, target dtype, options) on zero rows first,
    # so that bad ones are reported by it, not by the tensor ops below.
    call(ops.cross_entropy_forward.default, buf[:0].view(0, classes, *spatial), target[:0], weight, *opts)
    total_weight = _total_weight(target, weight, classes, opts.ignore_index, prob, acc)
    if forward:
        loss_dtype = x.dtype if loss_dtype is None else loss_dtype
        loss = x.new_empty((rows, *spatial), dtype=loss_dtype) if reduction == _NONE else x.new_zeros((), dtype=acc)
        z_sum = x.new_zeros((), dtype=acc)
        lse = x.new_empty((rows, *spatial), dtype=torch.float64)  # as the kernel saves it
    gx = gw = gb = None
    if grads:
        zero = torch.zeros_like(grad_loss)
        if want_x:
            gx = x.new_empty(x.shape)
        if want_w:  # low-precision weights accumulate their gradient in float32
            gw = w.new_zeros(w.shape, dtype=acc)
            gw2 = gw.view(-1, hidden)
        if want_b:
            gb = w.new_zeros(w.shape[:-1], dtype=acc)
            gb1 = gb.view(-1)

    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        x_c, t_c = x[start:end], target[start:end]
        logits2d = buf[: end - start]
        if b2 is None:
            torch.mm(x_c, w2.t(), out=logits2d)
        else:
            torch.addmm(b2, x_c, w2.t(), out=logits2d)
        logits = logits2d.view(end - start, classes, *spatial)
        if forward:
            # 'mean' is summed here and divided by the global total weight at the end.
            loss_c, z_c, lse_c = call(ops.cross_entropy_forward.default, logits, t_c, weight, *sum_opts,
                                      loss_dtype=loss.dtype)[:3]
            lse[start:end] = lse_c
            if reduction == _NONE:
                loss[start:end] = loss_c
            else:
                loss += loss_c
                z_sum += z_c
        if not grads:
            continue
        g_c = grad_loss[start:end] if reduction == _NONE else grad_loss
        z_c = zero[start:end] if reduction == _NONE else zero
        args = (g_c, z_c, logits, t_c, weight, lse[start:end], total_weight, *opts)
        if inplace:
            call(ops.cross_entropy_backward_inplace.default, *args)
            grad2d = logits2d
        else:
            grad2d = call(ops.cross_entropy_backward.default, *args)[0].view(end - start, -1)
        if want_x:
            torch.mm(grad2d, w2, out=gx[start:end])
        if want_w:
            _accumulate_weight_grad(gw2, grad2d, x_c)
        if want_b:
            gb1 += grad2d.sum(0, dtype=acc)

    if forward and reduction != _NONE:
        if reduction == _MEAN:
            loss = _mean(loss, z_sum, total_weight)
        loss = loss.to(loss_dtype)
    return (loss if forward else None), lse, gx, gw, gb


def _grads_or_empty(input, linear_weight, grads, dtype):
    """The gradient outputs of the ops: computed ones, or empty tensors for those not asked
    for (the same dtypes and shapes in the real and the fake kernels)."""
    gx, gw, gb = grads
    return (input.new_empty(0) if gx is None else gx,
            linear_weight.new_empty(0, dtype=dtype) if gw is None else gw.to(dtype),
            linear_weight.new_empty(0, dtype=dtype) if gb is None else gb.to(dtype))


def _read_call(rest, kwargs):
    """LossOptions, chunk_size and the three gradient flags of a call of the linear ops (the
    dispatcher passes them positionally, a user may name them)."""
    options, (chunk_size, *flags) = _options_and(
        rest, kwargs, ("chunk_size", None), ("grad_input", False), ("grad_linear_weight", False),
        ("grad_linear_bias", False))
    return options, chunk_size, flags


def _loss_dtype_of(rest, kwargs):
    """The forward op's loss_dtype (its last argument)."""
    n = len(LossOptions._fields) + 4  # the options, chunk_size and the three flags
    return kwargs.get("loss_dtype", rest[n] if len(rest) > n else None)


@torch.library.impl("fastce::linear_cross_entropy_forward", "CompositeExplicitAutograd")
def _forward_impl(input, linear_weight, linear_bias, target, weight, *rest, **kwargs):
    """loss, the rows' lse (kept for 'none', else empty), and for 'mean'/'sum' the requested
    gradients for grad_output = 1 (those of the weight and bias in float32 for low-precision
    inputs, rounded after scaling)."""
    options, chunk_size, flags = _read_call(rest, kwargs)
    precompute = options.reduction != _NONE and any(flags)
    loss, lse, *grads = _loop(input, linear_weight, linear_bias, target, weight, options, chunk_size,
                              None, input.new_ones(()) if precompute else None, *flags,
                              loss_dtype=_loss_dtype_of(rest, kwargs))
    if options.reduction != _NONE:
        lse = lse.new_empty(0)
    return loss, lse, *_grads_or_empty(input, linear_weight, grads, _acc_dtype(input.dtype))


@torch.library.impl("fastce::linear_cross_entropy_backward", "CompositeExplicitAutograd")
def _backward_impl(grad_loss, input, linear_weight, linear_bias, target, weight, lse, *rest, **kwargs):
    """reduction='none': recomputes each chunk's logits and returns the requested gradients
    (in the parameters' dtypes) for the per-row grad_loss."""
    options, chunk_size, flags = _read_call(rest, kwargs)
    _, _, *grads = _loop(input, linear_weight, linear_bias, target, weight, options._replace(reduction=_NONE),
                         chunk_size, lse, grad_loss, *flags)
    return _grads_or_empty(input, linear_weight, grads, linear_weight.dtype)


def _fake_grads(input, linear_weight, flags, dtype):
    grad_input, grad_linear_weight, grad_linear_bias = flags
    return _grads_or_empty(input, linear_weight, (
        input.new_empty(input.shape) if grad_input else None,
        linear_weight.new_empty(linear_weight.shape) if grad_linear_weight else None,
        linear_weight.new_empty(linear_weight.shape[:-1]) if grad_linear_bias else None), dtype)


@torch.library.register_fake("fastce::linear_cross_entropy_forward")
def _forward_fake(input, linear_weight, linear_bias, target, weight, *rest, **kwargs):
    options, _, flags = _read_call(rest, kwargs)
    reduced = options.reduction != _NONE
    rows_shape = (input.shape[0], *linear_weight.shape[1:-1])
    loss = input.new_empty(() if reduced else rows_shape, dtype=_loss_dtype_of(rest, kwargs) or input.dtype)
    lse = input.new_empty((0,) if reduced else rows_shape, dtype=torch.float64)
    computed = [flag and reduced for flag in flags]
    return loss, lse, *_fake_grads(input, linear_weight, computed, _acc_dtype(input.dtype))


@torch.library.register_fake("fastce::linear_cross_entropy_backward")
def _backward_fake(grad_loss, input, linear_weight, linear_bias, target, weight, lse, *rest, **kwargs):
    _, _, flags = _read_call(rest, kwargs)
    return _fake_grads(input, linear_weight, flags, linear_weight.dtype)


def _setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, *rest = inputs
    options, chunk_size, flags = _read_call(rest, {})
    _, lse, gx, gw, gb = output
    ctx.options, ctx.chunk_size = options, chunk_size
    ctx.computed = flags  # what it differentiates
    ctx.weight_dtype = linear_weight.dtype
    # The inputs are kept for 'mean'/'sum' too (references, no copies): a backward with
    # create_graph=True recomputes the gradients differentiably from them.
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight,
                          *((lse,) if options.reduction == _NONE else (gx, gw, gb)))
    ctx.mark_non_differentiable(lse, gx, gw, gb)
    # No zero-filled gradients for those outputs: gw alone would cost a V x H buffer.
    ctx.set_materialize_grads(False)


def _scale(grad, grad_loss, dtype):
    """grad * grad_loss in `dtype`. In eager mode in place (one gradient-sized buffer less):
    the precomputed gradient is not needed afterwards, and autograd's version check rejects
    a second backward through it. Traced graphs (torch.compile, opcheck) cannot express a
    write into a saved tensor, so they get the out-of-place product."""
    if not _tracing(grad) and grad.dtype == dtype:
        return grad.mul_(grad_loss)
    return (grad * grad_loss).to(dtype)


def _composite_loss(x, linear_weight, linear_bias, target, weight, options, loss_dtype=None):
    """The loss of (rows, H) input through fastce.cross_entropy on materialized logits: the
    form torch.func transforms, forward-mode AD and double backward differentiate (the
    fused ops' gradients are computed by their loops, outside autograd). Memory: the logits."""
    classes, spatial = linear_weight.shape[0], linear_weight.shape[1:-1]
    logits = torch.nn.functional.linear(x, linear_weight.reshape(-1, linear_weight.shape[-1]),
                                        None if linear_bias is None else linear_bias.reshape(-1))
    if spatial:
        logits = logits.view(x.shape[0], classes, *spatial)
    return cross_entropy_loss(logits, target, weight, options, loss_dtype=loss_dtype)[0]


def _differentiable_backward(ctx, grad_loss, wanted):
    """create_graph=True: the requested gradients as functions of the inputs (and grad_loss),
    by autograd through _composite_loss."""
    input, linear_weight, linear_bias, target, weight = ctx.saved_tensors[:5]
    wrt = [t for t, want in zip((input, linear_weight, linear_bias), wanted) if want]
    with torch.enable_grad():
        loss = _composite_loss(input, linear_weight, linear_bias, target, weight, ctx.options)
        grads = iter(torch.autograd.grad(loss, wrt, grad_loss, create_graph=True))
    return tuple(next(grads) if want else None for want in wanted)


def _backward(ctx, grad_loss, _grad_lse, _gx, _gw, _gb):
    want_x, want_w, want_b = (n and c for n, c in zip(ctx.needs_input_grad, ctx.computed))
    if torch.is_grad_enabled():  # create_graph=True
        gx, gw, gb = _differentiable_backward(ctx, grad_loss, (want_x, want_w, want_b))
    elif ctx.options.reduction == _NONE:
        input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
        gx, gw, gb = ops.linear_cross_entropy_backward.default(
            grad_loss, input, linear_weight, linear_bias, target, weight, lse, *ctx.options,
            ctx.chunk_size, want_x, want_w, want_b)
    else:
        try:
            gx, gw, gb = ctx.saved_tensors[5:]
        except RuntimeError as e:  # they were scaled in place by a first backward
            raise RuntimeError(
                "fastce.linear_cross_entropy: backward through the same graph twice is not "
                "supported for reduction='mean'/'sum' (the gradients computed in forward are "
                "consumed by the first backward)") from e
        gx = _scale(gx, grad_loss, gx.dtype) if want_x else None
        gw = _scale(gw, grad_loss, ctx.weight_dtype) if want_w else None
        gb = _scale(gb, grad_loss, ctx.weight_dtype) if want_b else None
    return (gx if want_x else None, gw if want_w else None, gb if want_b else None,
            *([None] * (len(ctx.needs_input_grad) - 3)))  # target, weight, options, flags


torch.library.register_autograd("fastce::linear_cross_entropy_forward", _backward,
                                setup_context=_setup_context)


def _check_shapes(input, linear_weight, target, linear_bias):
    """torch's checks (same types and messages), extended to inputs of shape (*, H).

    Returns the batch shape, the class count and the spatial dims of a K-dim weight."""
    if input.dim() < 1:
        raise RuntimeError(f"expected input with dimensionality at least 1, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError("expected linear_weight with dimensionality at least 2, got "
                           f"{linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    classes, spatial = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (classes, *spatial):
        raise RuntimeError(
            f"expected linear_bias shape {(classes, *spatial)}, got {tuple(linear_bias.shape)}")
    batch = tuple(input.shape[:-1])
    if spatial and len(batch) != 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
            f"requires batched input, (N, {input.shape[-1]}), got "
            f"{'' if batch else 'unbatched '}input with shape {tuple(input.shape)}")
    tshape = tuple(target.shape)
    if tshape in ((*batch, *spatial), (*batch, classes, *spatial)):
        return batch, classes, spatial
    # The errors of cross_entropy on the logits (*batch, classes, *spatial).
    if len(batch) == 0:
        raise ValueError("For 1D input, 1D target must have size 1, but got target size: "
                         f"{tshape[0] if tshape else 0}")
    if len(batch) == 1:
        n_target = tshape[0] if tshape else 0
        if n_target != batch[0]:
            raise ValueError(f"Expected input batch_size ({batch[0]}) to match target "
                             f"batch_size ({n_target}).")
        if not spatial:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    raise RuntimeError(f"Expected target size {list((*batch, *spatial))}, got {list(tshape)}")


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    options=None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
    chunk_size: Optional[int] = None,
    shift: int = 0,
    loss_dtype: Optional[torch.dtype] = None,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    use_token_scaling: bool = False,
) -> Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without
    materializing the logits; the same arguments and results as torch 2.13's
    ``torch.nn.functional.linear_cross_entropy``, plus fastce's options.

    - ``input``: ``(*, H)``, any number of batch dims (torch accepts ``(H)`` and ``(N, H)``);
      ``target``: ``(*)`` class indices or ``(*, V)`` probabilities.
    - ``linear_weight``: ``(V, H)`` as in ``nn.Linear``, or ``(V, d_1, ..., d_K, H)`` for a
      K-dimensional loss over ``(N, H)`` input, with target ``(N, d_1, ..., d_K)``.
    - ``logit_scale``, ``softcap``, ``lse_square_scale``: as in :func:`fastce.cross_entropy`.
    - ``chunk_size``: rows per chunk; by default chosen from the shapes and the device.
    - ``shift``: Cut Cross-Entropy's: ``shift=k`` pairs ``input[..., :-k, :]`` with
      ``target[..., k:]`` (next-token prediction from unshifted hidden states and labels),
      without copying ``input``; the loss for ``reduction='none'`` has ``k`` fewer positions
      in the last batch dimension. Class-index targets only.
    - ``loss_dtype``: the loss's dtype (default: the input's); ``torch.float32`` keeps a
      16-bit input's loss in float32.
    - ``options``: torch's ``LinearCrossEntropyOptions``, accepted so that calls written for
      torch work; only its ``batch_chunk_size`` is used (as ``chunk_size``). fastce always
      chunks and accumulates low-precision gradients in float32.

    Peak extra memory is one chunk of logits plus the gradients. ``reduction='mean'/'sum'``
    computes the gradients during the forward pass when they are needed, so backward is
    cheap; ``'none'`` recomputes the logits in backward.

    ``return_token_accuracy``, ``return_predicted_tokens``, ``use_token_scaling``: as in
    :func:`fastce.cross_entropy` (a ``CrossEntropyOutput`` is returned); together they take one
    more pass of matmuls over the chunks (a ``(V, H)`` linear_weight only).
    """
    if return_token_accuracy or return_predicted_tokens or use_token_scaling:
        from .token import linear_cross_entropy_token_outputs
        return linear_cross_entropy_token_outputs(
            input, linear_weight, target, linear_bias, weight, reduction, ignore_index, return_token_accuracy,
            return_predicted_tokens, use_token_scaling, label_smoothing=label_smoothing, options=options,
            logit_scale=logit_scale, softcap=softcap, lse_square_scale=lse_square_scale, chunk_size=chunk_size,
            shift=shift, loss_dtype=loss_dtype)
    if shift:
        input, target, unshift = _shifted(input, target, shift, ignore_index, linear_weight)
    batch, classes, spatial = _check_shapes(input, linear_weight, target, linear_bias)
    reduction_enum = _reduction_enum(reduction)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if chunk_size is None and options is not None:
        chunk_size = options.batch_chunk_size
    if ignore_index is None:
        ignore_index = -100
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "fastce.linear_cross_entropy does not compute gradients for probability targets; "
            "use fastce.cross_entropy on the logits instead")
    prob = target.dim() == len(batch) + 1 + len(spatial)
    rows = math.prod(batch)
    x = input.reshape(rows, input.shape[-1])
    t = target.reshape(rows, *target.shape[len(batch):])
    if prob and t.dtype != input.dtype:
        t = t.to(input.dtype)
    grad = torch.is_grad_enabled()
    try:
        options = LossOptions(reduction_enum, ignore_index, float(label_smoothing), float(logit_scale),
                              None if softcap is None else float(softcap), float(lse_square_scale))
        if _transforms_active():  # torch.func / forward-mode AD: the logits materialized
            loss = _composite_loss(x, linear_weight, linear_bias, t, weight, options, loss_dtype)
        else:
            loss = ops.linear_cross_entropy_forward.default(
                x, linear_weight, linear_bias, t, weight, *options, chunk_size, grad and input.requires_grad,
                grad and linear_weight.requires_grad,
                grad and linear_bias is not None and linear_bias.requires_grad, loss_dtype)[0]
    except _ARGUMENT_ERRORS as error:
        if spatial:
            raise
        raise_as_torch(error, lambda: torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(input, linear_weight, linear_bias), as_torch_target(target), weight,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing))
    if reduction_enum == _NONE:
        loss = loss.reshape((*batch, *spatial))
        if shift:
            loss = unshift(loss)
    return loss


def _shifted(input, target, shift, ignore_index, linear_weight):
    """Cut Cross-Entropy's shift without a copy of input: position p's hidden state is paired
    with the target of position p + shift, and the last `shift` positions (which have none)
    with ignore_index, so they add nothing to the loss, its 'mean' divisor or the gradients.
    Returns the input, the re-indexed target (O(positions)) and the map from the per-position
    loss to the shifted one (a view)."""
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a non-negative int, got {shift!r}")
    if target.is_floating_point() or input.dim() < 2 or linear_weight.dim() != 2:
        raise ValueError("shift takes class-index targets of shape (..., T) for input (..., T, H)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"shift: target shape {tuple(target.shape)} must be input's {tuple(input.shape[:-1])} "
                         "without its last dimension")
    ignore = -100 if ignore_index is None else ignore_index
    shifted = torch.full_like(target, ignore)
    shifted[..., :max(target.shape[-1] - shift, 0)] = target[..., shift:]
    return input, shifted, lambda loss: loss[..., :max(loss.shape[-1] - shift, 0)]


class LinearCrossEntropyLoss(getattr(torch.nn, "LinearCrossEntropyLoss", torch.nn.Module)):
    """``torch.nn.LinearCrossEntropyLoss`` (torch >= 2.13) computed by
    :func:`fastce.linear_cross_entropy`, also on torch versions without it.

    The same attributes and ``state_dict`` as torch's module (``linear`` holds the
    ``(V * prod(out_features), H)`` weight; ``weight`` is the class-weight buffer), and a
    subclass of it where it exists. fastce's options follow torch's arguments; of torch's
    ``options`` only ``batch_chunk_size`` is used (see :func:`linear_cross_entropy`).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: Sequence[int] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        lse_square_scale: float = 0.0,
        chunk_size: Optional[int] = None,
        shift: int = 0,
        loss_dtype: Optional[torch.dtype] = None,
    ) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(
                f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(
                f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        # torch's __init__ builds the same state; calling Module's keeps one code path for
        # torch versions with and without the base class.
        torch.nn.Module.__init__(self)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)
        self.options = options
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.lse_square_scale = lse_square_scale
        self.chunk_size = chunk_size
        self.shift = shift
        self.loss_dtype = loss_dtype

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias
        return linear_cross_entropy(
            input, self.linear.weight.reshape(*shape, self.linear.in_features), target,
            linear_bias=None if bias is None else bias.reshape(shape), weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options,
            logit_scale=self.logit_scale, softcap=self.softcap,
            lse_square_scale=self.lse_square_scale, chunk_size=self.chunk_size, shift=self.shift,
            loss_dtype=self.loss_dtype)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                 f"out_features={self.out_features}", f"bias={self.linear.bias is not None}",
                 f"reduction={self.reduction}", f"ignore_index={self.ignore_index}",
                 f"label_smoothing={self.label_smoothing}"]
        for name, default in (("options", None), ("logit_scale", 1.0), ("softcap", None),
                              ("lse_square_scale", 0.0), ("chunk_size", None), ("shift", 0),
                              ("loss_dtype", None)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        return ", ".join(parts)
