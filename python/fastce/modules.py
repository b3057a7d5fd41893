"""nn.Module front: a drop-in for torch.nn.CrossEntropyLoss."""
from typing import Optional

import torch
from torch import Tensor

from .functional import _legacy_reduction, cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by fastce's kernels.

    It subclasses torch's module, so it has the same attributes (``weight`` is a buffer),
    the same ``state_dict`` and passes every ``isinstance(m, nn.CrossEntropyLoss)`` check.
    The keyword-only options are those of :func:`fastce.cross_entropy`.
    """

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        lse_square_scale: float = 0.0,
        return_z_loss: bool = False,
        inplace_backward: bool = False,
        loss_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        if size_average is not None or reduce is not None:
            self.reduction = _legacy_reduction(size_average, reduce)
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.lse_square_scale = lse_square_scale
        self.return_z_loss = return_z_loss
        self.inplace_backward = inplace_backward
        self.loss_dtype = loss_dtype

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale, softcap=self.softcap,
            lse_square_scale=self.lse_square_scale, return_z_loss=self.return_z_loss,
            inplace_backward=self.inplace_backward, loss_dtype=self.loss_dtype)

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.logit_scale != 1.0:
            parts.append(f"logit_scale={self.logit_scale}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.lse_square_scale:
            parts.append(f"lse_square_scale={self.lse_square_scale}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        if self.loss_dtype is not None:
            parts.append(f"loss_dtype={self.loss_dtype}")
        return ", ".join(parts)
