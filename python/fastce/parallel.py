"""Vocabulary-parallel cross-entropy over torch.distributed (tensor-parallel LM heads).

Each rank holds a contiguous slice of the vocabulary and runs fastce's own loss ops on it, as
a slice: ``class_offset`` and ``vocab_size`` tell the kernels where the slice lies, so a target
held by another rank adds no target term here and label smoothing spreads over the whole
vocabulary. One read of the slice gives, per row, its loss against its own lse ``loss_k``
(float64) and what the merge needs (csrc/rules.h: SliceLse): its lse as ``m_k + r_k`` (max and
log-sum relative to it, exact where float64 cannot hold their sum: rows masked with
finfo.min, ties at 1e30) and the weight ``w_k`` of the lse in its loss (the loss is linear in
the lse). The ranks then exchange O(rows) numbers:

1. max of ``m_k``: ``M``;
2. sum, in one tensor: ``exp(m_k - M + r_k)`` (whose log is ``R``), ``w_k`` and
   ``loss_k + w_k ((M - m_k) - r_k)``. The whole vocabulary's lse is ``L = M + R``, and the
   row's cross-entropy ``sum_k loss_k + w_k (L - lse_k)``, with ``L - lse_k`` taken in float64
   pieces ``(M - m_k) + (R - r_k)``: the second sum plus ``R`` times the first.

The backward is the same backward op given the whole vocabulary's lse as the pair (M, R): no
communication. The collectives are torch.distributed's functional ones under torch.compile.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from ._ops import LossOptions, call, ops
from .functional import _reduction_enum, is_dtensor

_NONE, _MEAN, _SUM = 0, 1, 2
_REDUCE_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def _all_reduce(t: Tensor, op: str, group) -> Tensor:
    """All-reduces a fresh tensor: traceably under torch.compile; in eager mode in place,
    which spares the functional collectives' Python dispatch (and their import of dynamo)."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_reduce(t, op, group))
    dist.all_reduce(t, op=_REDUCE_OPS[op], group=group)
    return t


def _slice_of(shard_classes, group):
    """(class_offset, vocab_size) of this rank's slice: from the slices' sizes (in rank order)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = torch.zeros(world, dtype=torch.int64)
    if dist.get_backend(group) == dist.Backend.NCCL:
        sizes = sizes.cuda()
    sizes[rank] = shard_classes
    sizes = _all_reduce(sizes, "sum", group).tolist()
    return sum(sizes[:rank]), sum(sizes)


def _merge(loss_k, slice_lse, group):
    """The whole vocabulary's cross-entropy of every row (float64) and its lse as (shift, rel)
    pairs, shape (*rows, 2), from this slice's loss and SliceLse (see the module's doc)."""
    m_k, r_k, w_k = slice_lse.unbind(-1)
    m = _all_reduce(m_k.clone(), "max", group)
    m = torch.where(torch.isfinite(m), m, 0.0)  # rows that hold nothing finite anywhere: NaN below
    # (A slice whose loss holds no lse adds its loss alone, even where its lse is -inf.)
    part = loss_k + torch.where(w_k == 0, 0.0, w_k * ((m - m_k) - r_k))
    sums = _all_reduce(torch.stack([torch.exp((m_k - m) + r_k), w_k, part]), "sum", group)
    r = torch.log(sums[0])
    loss = sums[2] + torch.where(sums[1] == 0, 0.0, sums[1] * r)
    return loss, torch.stack([m, r], -1)


class _VocabParallelLoss(torch.autograd.Function):
    """Per-row loss of the whole vocabulary (float64, z-loss included, 0 on ignored rows), its
    z-loss, the whole vocabulary's lse as (shift, rel) pairs, and the mean's divisors."""

    @staticmethod
    def forward(logits, target, options, group):
        loss_k, _, slice_lse, total_weight, _ = call(
            ops.cross_entropy_forward.default, logits, target, None,
            *options._replace(reduction=_NONE, lse_square_scale=0.0), loss_dtype=torch.float64)
        loss, lse = _merge(loss_k, slice_lse, group)
        ignored = target == options.ignore_index
        # The z-loss of the whole vocabulary's lse (csrc/rules.h: z_loss), which no slice's op
        # call can give: the one place outside rules.h that states it.
        s = options.lse_square_scale
        z = torch.zeros_like(loss) if s == 0 else (s * lse.sum(-1) ** 2).masked_fill(ignored, 0.0)
        return (loss + z).masked_fill(ignored, 0.0), z, lse, total_weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, options, _ = inputs
        _, _, lse, total_weight = output
        ctx.save_for_backward(logits, target, lse, total_weight)
        ctx.options = options
        ctx.mark_non_differentiable(lse, total_weight)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad, grad_z, *_):
        if torch.is_grad_enabled():  # the gradient below is not recorded: say so, never a zero
            raise NotImplementedError(
                "fastce.parallel: double backward (create_graph=True) through the vocabulary-parallel loss "
                "is not supported")
        if grad is None and grad_z is None:
            return None, None, None, None
        logits, target, lse, total_weight = ctx.saved_tensors
        grad = torch.zeros_like(grad_z) if grad is None else grad
        grad_z = torch.zeros_like(grad) if grad_z is None else grad_z
        grad_logits, _ = call(ops.cross_entropy_backward.default, grad, grad_z, logits, target,
                              None, lse, total_weight, *ctx.options._replace(reduction=_NONE))
        return grad_logits, None, None, None


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
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    loss_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Cross-entropy of logits whose classes are split across the ranks of ``group``.

    Rank ``r`` of ``group`` (default: the world) holds the contiguous vocabulary shard
    ``r`` (shards in rank order; sizes may differ, even be 0) in dimension 1 of
    ``logits`` (dimension 0 for 1-D logits), shaped like ``torch.nn.functional.cross_entropy``'s
    input. ``target`` holds global class indices and is the same on every rank. Every rank
    returns the loss of the full vocabulary, what ``cross_entropy`` of the concatenated
    logits returns (label smoothing spreads over the global vocabulary); the backward pass
    gives each rank the gradient of its own shard and communicates nothing.

    ``vocab_start`` and ``vocab_size`` (this rank's first class and the whole vocabulary's
    size) spare one exchange of the shard sizes when given; under ``torch.compile`` give them
    (the exchange reads its result on the host). ``logit_scale``, ``softcap`` and
    ``lse_square_scale`` are those of ``fastce.cross_entropy``. Every rank must call this with
    the same options and row count. ``loss_dtype``: the loss's dtype (default: the logits').
    """
    reduction_enum = _reduction_enum(reduction)
    if target.is_floating_point():
        raise ValueError("vocab_parallel_cross_entropy takes class indices as target, not probabilities")
    group = dist.group.WORLD if group is None else group
    shard_classes = logits.shape[0 if logits.dim() == 1 else 1] if logits.dim() else 0
    if vocab_start is None or vocab_size is None:
        vocab_start, vocab_size = _slice_of(shard_classes, group)
    options = LossOptions(_NONE, ignore_index, float(label_smoothing), float(logit_scale),
                          None if softcap is None else float(softcap), float(lse_square_scale),
                          int(vocab_start), int(vocab_size))
    loss, _, _, total_weight = _VocabParallelLoss.apply(logits, target, options, group)
    loss_dtype = logits.dtype if loss_dtype is None else loss_dtype
    if reduction_enum == _NONE:
        return loss.to(loss_dtype)
    total = loss.sum()
    if reduction_enum == _MEAN:
        # csrc/rules.h: reduce_losses divides the cross-entropy by total_weight[0] and the
        # z-loss by total_weight[1]; a slice takes no class weights, so the two are equal
        # (the op gives both) and the sum of both divides by one. No op reduces rows given
        # from outside, so this division is stated here.
        total = total / total_weight[0]
    return total.to(loss_dtype)


# ---- DTensor logits --------------------------------------------------------------------------

def _local_target(target, mesh, placements):
    """The target rows of this rank's logits: a DTensor target is laid out like them; a plain
    one is the global target, the same on every rank (as torch's loss_parallel takes it)."""
    from torch.distributed.tensor import distribute_tensor
    if not placements:  # the whole target
        return target.full_tensor() if is_dtensor(target) else target
    if is_dtensor(target):
        return target.redistribute(mesh, placements).to_local()
    return distribute_tensor(target, mesh, placements).to_local()


def dtensor_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, logit_scale, softcap,
                          lse_square_scale, return_z_loss, loss_dtype):
    """fastce.cross_entropy of DTensor logits on a one-dimensional mesh:

    - sharded on the class dimension: the vocabulary-parallel loss over the mesh's group (what
      torch's ``loss_parallel()`` + ``F.cross_entropy`` gives), replicated on every rank;
    - sharded on the batch dimension (``Shard(0)``): each rank's rows, reduced over the global
      batch: 'mean' divides by the global total weight (a ``Partial`` sum), 'none' stays
      ``Shard(0)``;
    - replicated: computed locally, replicated.

    Anything else (class weights or probabilities or return_z_loss with a class-sharded input,
    a mesh of more dimensions, other placements) is computed on the replicated logits.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from .functional import cross_entropy
    from .linear import _mean, _total_weight
    mesh, placements = input.device_mesh, tuple(input.placements)
    class_dim = 0 if input.dim() == 1 else 1
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, logit_scale=logit_scale,
                   softcap=softcap, lse_square_scale=lse_square_scale, loss_dtype=loss_dtype)
    one_dim = mesh.ndim == 1
    index_target = not (target.is_floating_point() and tuple(target.shape) == tuple(input.shape))

    def replicated(t):
        return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)

    if one_dim and placements == (Shard(class_dim),) and index_target and weight is None and not return_z_loss:
        loss = vocab_parallel_cross_entropy(
            input.to_local(), _local_target(target, mesh, ()), group=mesh.get_group(), reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
            lse_square_scale=lse_square_scale, loss_dtype=loss_dtype)
        return replicated(loss)
    if one_dim and placements == (Shard(0),) and input.dim() >= 2:
        x = input.to_local()
        t = _local_target(target, mesh, [Shard(0)])
        w = weight.full_tensor() if is_dtensor(weight) else weight
        if reduction == "none":
            out = cross_entropy(x, t, w, reduction="none", return_z_loss=return_z_loss, **options)
            rows = (input.shape[0], *input.shape[2:])  # global (shards may be uneven)
            strides = torch.empty(rows, device="meta").stride()
            shard = lambda v: DTensor.from_local(v, mesh, [Shard(0)], run_check=False,  # noqa: E731
                                                 shape=rows, stride=strides)
            return tuple(map(shard, out)) if return_z_loss else shard(out)
        loss, z = cross_entropy(x, t, w, reduction="sum", return_z_loss=True, **options)
        if reduction == "mean":  # over the global batch: the divisors summed over the ranks
            divisors = _total_weight(t, w, x.shape[class_dim], ignore_index, not index_target,
                                     torch.float64).detach().clone()
            dist.all_reduce(divisors, group=mesh.get_group())
            loss, z = _mean(loss.double(), z.double(), divisors).to(loss.dtype), (z.double() / divisors[1]).to(z.dtype)
        partial = lambda v: DTensor.from_local(v, mesh, [Partial()], run_check=False)  # noqa: E731
        return (partial(loss), partial(z)) if return_z_loss else partial(loss)
    # Replicated, or what the paths above do not take: the whole logits on every rank.
    x = input.to_local() if all(p.is_replicate() for p in placements) else input.full_tensor()
    t = target.full_tensor() if is_dtensor(target) else target
    w = weight.full_tensor() if is_dtensor(weight) else weight
    out = cross_entropy(x, t, w, reduction=reduction, return_z_loss=return_z_loss, **options)
    return tuple(map(replicated, out)) if return_z_loss else replicated(out)
