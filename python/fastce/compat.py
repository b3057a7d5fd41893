"""The peers' call signatures on fastce's kernels: switching is an import change.

``flash_attn_cross_entropy_loss`` is flash-attn's ``flash_attn.ops.triton.cross_entropy.
cross_entropy_loss`` (used by verl and others), with its semantics: per-row float32 losses and
z-losses of (rows, vocab) logits, the z-loss included in the loss, ignored rows 0, label
smoothing over the whole vocabulary, and ``process_group`` for a vocabulary split in equal
contiguous shards across its ranks (tensor parallelism).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._ops import LossOptions, call, ops
from .functional import cross_entropy

_NONE = 0


def _row_divisors(lse):
    # reduction='none' divides by nothing; the backward op takes the divisors all the same
    return lse.new_ones(2, dtype=torch.float32)


class _PrecomputedLse(torch.autograd.Function):
    """flash-attn's precomputed_lse: the rows' lse is given, so the forward reads one logit per
    row (loss = lse - z_target + z-loss), and the backward takes the softmax from that lse."""

    @staticmethod
    def forward(logits, labels, lse, options, inplace_backward):
        valid = labels != options.ignore_index
        target = torch.where(valid, labels, 0).long().unsqueeze(1)
        lse = lse.float()
        z = options.lse_square_scale * lse * lse
        losses = torch.where(valid, lse - logits.gather(1, target).squeeze(1).float() + z, 0.0)
        return losses, torch.where(valid, z, 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, lse, options, inplace_backward = inputs
        ctx.save_for_backward(logits, labels, lse)
        ctx.options, ctx.inplace_backward = options, inplace_backward
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_losses, _grad_z_losses):  # z_losses are for logging (as flash-attn)
        logits, labels, lse = ctx.saved_tensors
        # As a slice that is the whole vocabulary: the kernels take a slice's lse as given
        # (some recompute a whole row's own lse instead of reading it), as (shift, rel) pairs.
        options = ctx.options._replace(class_offset=0, vocab_size=logits.shape[1])
        lse = lse.double()
        pairs = torch.stack([torch.zeros_like(lse), lse], -1)
        args = (grad_losses.contiguous(), torch.zeros_like(grad_losses), logits, labels, None, pairs,
                _row_divisors(lse), *options)
        if ctx.inplace_backward:
            call(ops.cross_entropy_backward_inplace.default, *args)
            return logits, None, None, None, None
        return call(ops.cross_entropy_backward.default, *args)[0], None, None, None, None


def _vocab_parallel(logits, labels, options, process_group):
    from .parallel import _VocabParallelLoss  # imports torch.distributed only when used
    world = torch.distributed.get_world_size(process_group)
    rank = torch.distributed.get_rank(process_group)
    classes = logits.shape[1]
    options = options._replace(class_offset=rank * classes, vocab_size=world * classes)
    losses, z_losses, _, _ = _VocabParallelLoss.apply(logits, labels, options, process_group)
    return losses.float(), z_losses.detach().float()


def flash_attn_cross_entropy_loss(
    logits: Tensor,
    labels: Tensor,
    precomputed_lse: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group=None,
) -> Tuple[Tensor, Tensor]:
    """flash-attn's ``cross_entropy_loss``: returns ``(losses, z_losses)``, both ``(rows,)``
    float32, for ``logits`` ``(rows, vocab)`` and ``labels`` ``(rows,)``.

    - ``losses[i] = CE_i + lse_square_scale * lse_i ** 2`` with ``lse_i`` the log-sum-exp of
      ``logit_scale * logits[i]``; rows whose label is ``ignore_index`` get 0 (and 0 z-loss).
    - ``z_losses`` is the z-loss part alone, for logging: not differentiable.
    - ``precomputed_lse`` (``(rows,)``): the rows' lse when the caller has it already; used, as
      flash-attn uses it, only with ``logit_scale == 1`` and no label smoothing (else
      ignored), and not with ``process_group``.
    - ``inplace_backward``: the gradient is written into ``logits``, which must not be used
      afterwards (a leaf's gradient is computed out of place).
    - ``process_group``: each rank holds ``logits[:, rank * V_local : (rank + 1) * V_local]``
      of the vocabulary (equal shards, as flash-attn); ``labels`` are global and the same on
      every rank; every rank gets the whole vocabulary's losses (fastce's vocabulary-parallel
      path; its backward writes out of place).

    Unlike flash-attn, a label outside ``[0, vocab)`` that is not ``ignore_index`` raises an
    ``IndexError`` (as torch) rather than counting as "no target term".
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (rows, vocab) and labels (rows,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if not logit_scale > 0.0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale}")
    options = LossOptions(_NONE, int(ignore_index), float(label_smoothing), float(logit_scale), None,
                          float(lse_square_scale))
    if process_group is not None and torch.distributed.get_world_size(process_group) > 1:
        return _vocab_parallel(logits, labels, options, process_group)
    if precomputed_lse is not None and logit_scale == 1.0 and label_smoothing == 0.0:
        if precomputed_lse.shape != labels.shape:
            raise ValueError(f"precomputed_lse must have shape {tuple(labels.shape)}, got "
                             f"{tuple(precomputed_lse.shape)}")
        return _PrecomputedLse.apply(logits, labels, precomputed_lse, options, bool(inplace_backward))
    losses, z_losses = cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing,
        logit_scale=logit_scale, lse_square_scale=lse_square_scale, return_z_loss=True,
        inplace_backward=inplace_backward and logits.requires_grad and not logits.is_leaf,
        loss_dtype=torch.float32)
    return losses, z_losses.detach()
