"""The public functional API: torch.nn.functional.cross_entropy, and more."""
from typing import Optional

import torch
from torch import Tensor

from ._errors import raise_as_torch
from ._ops import REDUCTIONS, LossOptions, cross_entropy_loss

_ARGUMENT_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError)


def is_dtensor(t) -> bool:
    """Whether t is a torch.distributed DTensor (without importing torch.distributed)."""
    return type(t) is not torch.Tensor and hasattr(t, "placements") and hasattr(t, "device_mesh")


def as_torch_target(target):
    """The target as torch takes it: fastce also takes int32 class indices."""
    return target.long() if target.dtype == torch.int32 else target


def _legacy_reduction(size_average, reduce):
    # torch.nn._reduction.legacy_get_string, without importing a private module
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        return "mean"
    return "sum" if reduce else "none"


def _reduction_enum(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


def _bad_argument_type(name, position, expected, value):
    raise TypeError(f"cross_entropy_loss(): argument '{name}' (position {position}) must be "
                    f"{expected}, not {type(value).__name__}")


def _check_argument_types(input, target, weight, ignore_index, label_smoothing):
    # What torch's argument parser rejects, with its TypeError.
    bad = _bad_argument_type
    if not isinstance(input, Tensor):
        bad("input", 1, "Tensor", input)
    if not isinstance(target, Tensor):
        bad("target", 2, "Tensor", target)
    if weight is not None and not isinstance(weight, Tensor):
        bad("weight", 3, "Tensor", weight)
    if not isinstance(ignore_index, int):
        bad("ignore_index", 5, "int", ignore_index)
    if not isinstance(label_smoothing, (int, float)):
        bad("label_smoothing", 6, "float", label_smoothing)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    inplace_backward: bool = False,
    loss_dtype: Optional[torch.dtype] = None,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    use_token_scaling: bool = False,
):
    """Cross-entropy between logits and targets; a drop-in for
    ``torch.nn.functional.cross_entropy`` (same arguments, results, gradients and errors).

    fastce's keyword-only options, applied inside the kernels:

    - ``logit_scale``: logits are multiplied by it first: ``z = logit_scale * input``.
    - ``softcap``: then soft-capped: ``z = softcap * tanh(z / softcap)``.
    - ``lse_square_scale``: z-loss; each non-ignored row adds
      ``lse_square_scale * logsumexp(z) ** 2``, not weighted by ``weight``; 'mean' divides it
      by the number of non-ignored rows (Liger-Kernel's definition).
    - ``return_z_loss``: also return the z-loss part alone, reduced the same way.
    - ``inplace_backward``: backward writes the gradient into ``input``'s storage instead of a
      new buffer. ``input`` must not be a leaf, and must not be used after the backward pass.
    - ``loss_dtype``: the dtype of the loss and z-loss (default: the input's, as torch; under
      ``torch.autocast``, float32 for 16-bit input, as torch). ``torch.float32`` gives 16-bit
      logits a float32 loss without rounding it to 16 bits (as flash-attn and quack return it).
      The gradient keeps the input's dtype.
    - ``return_token_accuracy``: also the fraction of non-ignored tokens whose argmax is the
      target (per token, 0 at ignored positions, for ``reduction='none'``).
    - ``return_predicted_tokens``: also the argmax of each position (lowest index on ties, as
      ``torch.argmax``; -1 at ignored positions).
    - ``use_token_scaling``: each token's loss is multiplied by the (detached) predicted
      probability of its target.

    With any of the last three, the result is a :class:`fastce.token.CrossEntropyOutput`
    ``(loss, z_loss, token_accuracy, predicted_tokens)`` (None for what is not requested).
    """
    if is_dtensor(input):  # torch's loss_parallel() pattern, and batch-sharded logits
        from .parallel import dtensor_cross_entropy
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        _reduction_enum(reduction)
        return dtensor_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, logit_scale,
                                     softcap, lse_square_scale, return_z_loss, loss_dtype)
    _check_argument_types(input, target, weight, ignore_index, label_smoothing)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    reduction_enum = _reduction_enum(reduction)
    if target.is_floating_point() and target.dtype != input.dtype and target.shape == input.shape:
        target = target.to(input.dtype)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "The function 'cross_entropy' is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True.")
    if inplace_backward and input.requires_grad and torch.is_grad_enabled():
        if input.is_leaf:
            raise RuntimeError(
                "inplace_backward=True would overwrite a leaf tensor that requires grad with its "
                "gradient; pass a tensor computed in the graph (e.g. the output of the LM head)")
    options = LossOptions(reduction_enum, ignore_index, float(label_smoothing), float(logit_scale),
                          None if softcap is None else float(softcap), float(lse_square_scale))
    try:
        if return_token_accuracy or return_predicted_tokens or use_token_scaling:
            from .token import cross_entropy_token_outputs
            return cross_entropy_token_outputs(input, target, weight, options, bool(inplace_backward), return_z_loss,
                                               return_token_accuracy, return_predicted_tokens, use_token_scaling,
                                               loss_dtype)
        loss, z_loss = cross_entropy_loss(input, target, weight, options, bool(inplace_backward), loss_dtype)
    except _ARGUMENT_ERRORS as error:
        raise_as_torch(error, lambda: torch.nn.functional.cross_entropy(
            input, as_torch_target(target), weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing))
    if return_z_loss:
        return loss, z_loss
    return loss
