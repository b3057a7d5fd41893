"""A float64 reference for every fastce option, written with plain torch ops."""
import torch
import torch.nn.functional as F


def reference_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, logit_scale=1.0, softcap=None,
                            lse_square_scale=0.0, return_z_loss=False):
    """scale -> softcap -> torch's cross_entropy (+ z-loss), in float64, differentiable."""
    z = input.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    prob = target.shape == input.shape
    tgt = target.double() if prob else target.long()
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(z, tgt, weight=w, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    class_dim = 0 if z.dim() == 1 else 1
    lse = torch.logsumexp(z, dim=class_dim)
    # Liger-Kernel's z-loss: lse_square_scale * lse^2 on every non-ignored row, not weighted by
    # the class weights, its mean over the non-ignored rows (every row of probability targets).
    counted = torch.ones_like(lse, dtype=torch.bool) if prob else tgt != ignore_index
    zl = lse_square_scale * torch.where(counted, lse * lse, 0.0)
    if reduction == "sum":
        zl = zl.sum()
    elif reduction == "mean":
        zl = zl.sum() / counted.sum()
    loss = ce + zl
    return (loss, zl) if return_z_loss else loss
