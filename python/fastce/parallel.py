"""Vocabulary-parallel cross-entropy over torch.distributed (tensor-parallel LM heads).

Each rank holds a contiguous shard of the vocabulary. Per row, the shard's pass
(``vocab_parallel_stats``, one read of the logits) gives the log-sum-exp and the sum of
the transformed logits; the ranks then exchange O(rows) numbers in two all-reduces:

1. max: each rank's shard lse, plus its shard size in its own slot (so every rank learns
   where its shard starts and the global vocabulary size without another collective);
2. sum, fused in one tensor: exp(shard lse - max), the target logit (non-zero on the rank
   that holds the target), and the smoothing sum (only with label smoothing).

``vocab_parallel_loss`` turns these into the loss of every row; its backward writes the
shard's gradient from the global lse alone, with no communication. The collectives are
torch.distributed's functional ones, so the function traces under torch.compile.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from ._ops import ops
from .functional import _reduction_enum

# float32 holds every integer up to 2**24 exactly: the shard sizes travel in the max exchange.
_MAX_FLOAT32_SHARD = 2**24


@torch.library.register_fake("fastce::vocab_parallel_stats")
def _stats_fake(logits, target, ignore_index, logit_scale, softcap):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = target.shape if logits.dim() > 1 else ()
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


@torch.library.register_fake("fastce::vocab_parallel_loss")
def _loss_fake(logits, target, shard_start, num_classes, lse, target_logit, sum_z, ignore_index,
               label_smoothing, logit_scale, softcap, lse_square_scale):
    return torch.empty_like(lse)


@torch.library.register_fake("fastce::vocab_parallel_backward")
def _backward_fake(grad, logits, target, shard_start, num_classes, lse, ignore_index,
                   label_smoothing, logit_scale, softcap, lse_square_scale):
    return logits.new_empty(logits.shape)


def _loss_setup_context(ctx, inputs, output):
    (logits, target, shard_start, num_classes, lse, _, _, ignore_index, label_smoothing,
     logit_scale, softcap, lse_square_scale) = inputs
    ctx.save_for_backward(logits, target, shard_start, num_classes, lse)
    ctx.options = (ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale)


def _loss_backward(ctx, grad):
    logits, target, shard_start, num_classes, lse = ctx.saved_tensors
    grad_logits = ops.vocab_parallel_backward(grad, logits, target, shard_start, num_classes, lse,
                                              *ctx.options)
    return (grad_logits,) + (None,) * 11


torch.library.register_autograd("fastce::vocab_parallel_loss", _loss_backward,
                                setup_context=_loss_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("vocab_parallel_cross_entropy does not support double backward")


torch.library.register_autograd("fastce::vocab_parallel_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


_REDUCE_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def _all_reduce(t: Tensor, op: str, group) -> Tensor:
    """All-reduces a fresh tensor: traceably under torch.compile; in eager mode in place,
    which spares the functional collectives' Python dispatch (and their import of dynamo)."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_reduce(t, op, group))
    dist.all_reduce(t, op=_REDUCE_OPS[op], group=group)
    return t


def _target_logit(logits, target, shard_start, ignore_index, logit_scale, softcap, acc):
    """z of each row's target where this shard holds it, else 0 (O(rows) work)."""
    class_dim = 0 if logits.dim() == 1 else 1
    shard_classes = logits.shape[class_dim]
    local = target.long() - shard_start
    inside = (target != ignore_index) & (local >= 0) & (local < shard_classes)
    if shard_classes == 0:
        return torch.zeros(inside.shape, dtype=acc, device=logits.device)
    index = local.clamp(0, shard_classes - 1).unsqueeze(class_dim)
    x = logits.detach().gather(class_dim, index).squeeze(class_dim).to(acc)
    # The same arithmetic as the kernels' transform.
    z = torch.tanh(x * (logit_scale / softcap)) * softcap if softcap is not None else x * logit_scale
    return torch.where(inside, z, 0.0)


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
) -> Tensor:
    """Cross-entropy of logits whose classes are split across the ranks of ``group``.

    Rank ``r`` of ``group`` (default: the world) holds the contiguous vocabulary shard
    ``r`` (shards in rank order; sizes may differ, even be 0) in dimension 1 of
    ``logits`` (dimension 0 for 1-D logits), shaped like ``torch.nn.functional.cross_entropy``'s
    input. ``target`` holds global class indices and is the same on every rank. Every rank
    returns the loss of the full vocabulary, what ``cross_entropy`` of the concatenated
    logits returns (label smoothing spreads over the global vocabulary); the backward pass
    gives each rank the gradient of its own shard and communicates nothing.

    ``logit_scale``, ``softcap`` and ``lse_square_scale`` are those of
    ``fastce.cross_entropy``. Every rank must call this with the same options and row count.
    """
    reduction_enum = _reduction_enum(reduction)
    if target.is_floating_point():
        raise ValueError("vocab_parallel_cross_entropy takes class indices as target, not probabilities")
    shard_classes = logits.shape[0 if logits.dim() == 1 else 1] if logits.dim() else 0
    if logits.dtype != torch.float64 and shard_classes > _MAX_FLOAT32_SHARD:
        raise ValueError(f"vocab_parallel_cross_entropy: a shard holds at most {_MAX_FLOAT32_SHARD} "
                         f"classes for {logits.dtype} logits, got {shard_classes}")
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    softcap = None if softcap is None else float(softcap)
    logit_scale, label_smoothing = float(logit_scale), float(label_smoothing)

    lse, sum_z = ops.vocab_parallel_stats(logits.detach(), target, ignore_index, logit_scale, softcap)
    acc = lse.dtype

    # Exchange 1 (max): the row maxima of the shard lse, and every shard's size.
    sizes = torch.zeros(world, dtype=acc, device=logits.device)
    sizes[rank] = shard_classes
    top = _all_reduce(torch.cat([lse.reshape(-1), sizes]), "max", group)
    rows = lse.numel()
    lse_max = top[:rows].view(lse.shape)
    sizes = top[rows:].to(torch.int64)
    shard_start, num_classes = sizes[:rank].sum(), sizes.sum()

    # Exchange 2 (sum): sum-exp against the common max, target logit, smoothing sum.
    z_t = _target_logit(logits, target, shard_start, ignore_index, logit_scale, softcap, acc)
    parts = [torch.exp(lse - lse_max), z_t] + ([sum_z] if label_smoothing > 0 else [])
    total = _all_reduce(torch.stack(parts).reshape(-1), "sum", group).view(len(parts), *lse.shape)
    global_lse = lse_max + torch.log(total[0])
    global_sum_z = total[2] if label_smoothing > 0 else sum_z  # (unused without smoothing)

    loss = ops.vocab_parallel_loss(logits, target, shard_start, num_classes, global_lse, total[1],
                                   global_sum_z, ignore_index, label_smoothing, logit_scale, softcap,
                                   float(lse_square_scale))
    if reduction_enum == 0:
        return loss.to(logits.dtype)
    if reduction_enum == 2:
        return loss.sum().to(logits.dtype)
    return (loss.sum() / (target != ignore_index).sum()).to(logits.dtype)
