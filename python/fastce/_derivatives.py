"""The loss's second derivatives, for double backward and forward-mode AD through the gradient.

The gradient op (csrc: cross_entropy_backward) returns (grad_x, grad_y) = the gradient of
    Phi(x, y) = sum_r g_r * loss_r(x, y) + gz_r * z_loss_r(x)
for the incoming gradients g, gz (divided by the mean's divisor). Its derivatives are
- in g and gz: linear, so the gradient op itself with other incoming gradients gives them
  (python/fastce/_ops.py calls it for that part);
- in (x, y): the Hessian of Phi, a symmetric matrix, so one product ``hessian_product``
  serves both a vector-Jacobian product (double backward) and a Jacobian-vector product
  (forward mode over the gradient).

Per row, in the transformed logits z = T(x) (rules.h: logit_transform) with p = softmax(z),
every loss is A * lse(z) minus a term linear in z (A: the weight of lse in the row's loss,
the same quantity rules.h's grad_coef folds into coef_p), and the z-loss is lss * lse^2 on
every non-ignored row (v_r = 1, 0 if ignored). With the incoming gradients divided by the
mean's divisors as rules.h's row_grads does (g_ce = g / total weight, g_z = (g + gz) / the
non-ignored rows, for 'mean') and the Hessian of lse, diag(p) - p p^T:
    H_zz v = c1 (p * v - p (p . v)) + c2 p (p . v),
    c1 = g_ce A + 2 lss v_r lse g_z   (= grad_coef's coef_p),   c2 = 2 lss v_r g_z.
In x: H_xx v = s * H_zz (s * v) + T''(x) * dPhi/dz * v with s = T'(x); for the soft cap
T'' = -2 k u s (u = tanh(k x), k = logit_scale / softcap), so the last term is
-2 k u * grad_x * v with the gradient op's own output grad_x.
Probability targets add the mixed block (Phi is linear in y, so H_yy = 0): with
y' = (1 - eps) y + eps / C, d lse-weight / dy_c = (1 - eps) w_c and the linear term's
d^2 / dz_c dy_c = -(1 - eps) w_c, hence
    H_zy u = g (1 - eps) (p (w . u) - w * u),    H_yz v = g (1 - eps) w * (p . v - v).

These are torch ops on the saved logits (O(rows x classes) memory: this path only runs for
second-order derivatives), themselves differentiable, so higher orders compose.
"""
import torch


def rows_view(t, input):
    """A tensor laid out like ``input`` (C), (N, C) or (N, C, d...) as (rows, C)."""
    if input.dim() == 1:
        return t.unsqueeze(0)
    if input.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(-1, input.shape[1])


def from_rows_view(t2d, input):
    """The inverse of rows_view."""
    if input.dim() == 1:
        return t2d.squeeze(0)
    if input.dim() == 2:
        return t2d
    spatial = input.shape[2:]
    return t2d.reshape(input.shape[0], *spatial, input.shape[1]).movedim(-1, 1)


def per_row(values, input, reduction):
    """Per-row values (rows, 1) of an incoming gradient: of shape () for a reduced loss,
    the rows' shape for reduction='none'."""
    rows = 1 if input.dim() == 1 else input.numel() // max(input.shape[1], 1)
    return values.reshape(-1, 1).expand(rows, 1) if reduction != 0 else values.reshape(rows, 1)


def _transform(x, options):
    """z = T(x), its slope T'(x), and T''(x) / T'(x) (None when T is linear): the torch form
    of rules.h's logit transform, for this path only."""
    scale = options.logit_scale
    if options.softcap is None or options.softcap <= 0:
        return x * scale, scale, None
    k = scale / options.softcap
    u = torch.tanh(x * k)
    return u * options.softcap, scale * (1 - u * u), -2 * k * u


def _check_supported(options):
    if options.class_offset != 0 or options.vocab_size >= 0:
        raise NotImplementedError(
            "fastce: second-order derivatives (double backward, forward-mode AD through the "
            "gradient) are not supported for a slice of the vocabulary (class_offset / "
            "vocab_size, fastce.parallel)")


def _row_terms(x2d, target, weight, input, options, g, gz):
    """p, the class weights w (C,), and the rows' c1, c2 and y-coefficient g (1 - eps)
    (all (rows, 1); zero for ignored rows), for the divided incoming gradients g (of the
    cross-entropy) and gz (of the z-loss)."""
    classes = x2d.shape[1]
    z, slope, curve = _transform(x2d, options)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    p = torch.exp(z - lse)
    w = x2d.new_ones(classes) if weight is None else weight.to(x2d.dtype)
    eps = options.label_smoothing
    smooth = eps / classes * w.sum()
    if target.is_floating_point():
        y = rows_view(target, input).to(x2d.dtype)
        lse_weight = (1 - eps) * (y * w).sum(dim=1, keepdim=True) + smooth
        counted = torch.ones_like(lse_weight)
    else:
        t = target.reshape(-1, 1).long()
        valid = t != options.ignore_index
        lse_weight = torch.where(valid, (1 - eps) * w[t.clamp(0, classes - 1)] + smooth, 0)
        counted = valid.to(x2d.dtype)
    lss = options.lse_square_scale
    c1 = g * lse_weight + 2 * lss * counted * lse * gz
    c2 = 2 * lss * counted * gz
    return p, slope, curve, w, c1, c2, g * (1 - eps)


def hessian_product(x_dir, y_dir, input, target, weight, grad_loss, grad_z_loss, total_weight, grad_x,
                    options):
    """(H_xx x_dir + H_xy y_dir, H_yx x_dir) of Phi (see the module's docstring) in the
    layouts of input and target; x_dir / y_dir may be None (zero). The second is None
    for class-index targets."""
    _check_supported(options)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    divisors = total_weight.to(acc) if options.reduction == 1 else (1.0, 1.0)  # (total weight, rows)
    g_loss = per_row(grad_loss.to(acc), input, options.reduction)
    g = g_loss / divisors[0]
    gz = (g_loss + per_row(grad_z_loss.to(acc), input, options.reduction)) / divisors[1]
    x2d = rows_view(input, input).to(acc)
    p, slope, curve, w, c1, c2, y_coef = _row_terms(x2d, target, weight, input, options, g, gz)
    prob = target.is_floating_point()

    hz = torch.zeros_like(x2d)  # H_z. (s * x_dir) + H_zy y_dir, in z
    hy = None
    if x_dir is not None:
        v = rows_view(x_dir, input).to(acc)
        vz = slope * v
        pv = (p * vz).sum(dim=1, keepdim=True)
        hz = c1 * (p * vz - p * pv) + c2 * p * pv
        if prob:
            hy = y_coef * w * (pv - vz)
    if y_dir is not None and prob:
        u = rows_view(y_dir, input).to(acc) * w
        hz = hz + y_coef * (p * u.sum(dim=1, keepdim=True) - u)
    hx = slope * hz
    if curve is not None and x_dir is not None:
        hx = hx + curve * rows_view(grad_x, input).to(acc) * v
    # (contiguous, as the gradient op's outputs: a tangent must have its primal's layout)
    hx = from_rows_view(hx, input).to(input.dtype).contiguous()
    return hx, None if hy is None else from_rows_view(hy, input).to(target.dtype).contiguous()
